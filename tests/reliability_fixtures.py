"""Session-scoped fixtures of the reliability tests: a tiny chat model (real tokenizer, random
weights) and a live server on it. Test modules load this file as a plugin
(`pytest_plugins = ("tests.reliability_fixtures",)`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability_utils import reliable_server_args
from tests.server_utils import ServerProcess
from tests.tiny_chat_model import save_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def reliable_server(tiny_chat_model, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("reliable") / "server.log"
    server = ServerProcess(reliable_server_args(tiny_chat_model), log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()
