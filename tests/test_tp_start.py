"""A tensor-parallel rank that fails while the engine starts ends the start at once, with that
rank's error: one that raises while it loads its shard (after joining the group), one whose
process exits before it joined, and one that hangs, after `distributed_timeout_seconds`.
No rank process is left behind, and the process can build the next engine. The server exits
with the rank's error and never answers /ready. Faults are planted through the environment
the spawned ranks inherit (`execution/ranks/faults.py`); 2 CPU ranks over gloo."""

from __future__ import annotations

import multiprocessing
import re
import time

import httpx
import pytest
import torch.distributed as dist

from tests.conftest import save_tiny_model
from tests.server_utils import ServerProcess
from tova_engine import LLM
from tova_engine.execution.ranks.faults import ENV_VAR
from tova_engine.execution.ranks.start import RankStartError, RemoteTraceback

FAIL_FAST_S = 30  # the hang was 600 s; a failed start takes a few here


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tp-start"), num_attention_heads=8,
                           num_key_value_heads=4)


def start(model, **options) -> LLM:
    return LLM(str(model), dtype="float64", device="cpu", state_size=6, max_num_seqs=2,
               tensor_parallel_size=2, **options)


def failed_start(model, **options) -> tuple[RankStartError, float]:
    began = time.monotonic()
    with pytest.raises(RankStartError) as info:
        start(model, **options)
    elapsed = time.monotonic() - began
    # Nothing left: no rank process, no group (the next engine may form its own).
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("tova-tp")]
    assert not dist.is_initialized()
    return info.value, elapsed


@pytest.mark.parametrize(("fault", "message"), [
    ("1:load:raise", r"rank 1 failed while loading its shard: RuntimeError: fault planted"),
    ("1:start:exit", r"rank 1's process exited with status 3 while starting"),
])
def test_a_rank_that_fails_ends_the_start_with_its_error(four_kv_heads, monkeypatch, fault,
                                                         message):
    monkeypatch.setenv(ENV_VAR, fault)
    error, elapsed = failed_start(four_kv_heads)
    assert elapsed < FAIL_FAST_S
    assert re.search(message, str(error)), str(error)
    if fault.endswith("raise"):  # the rank's own traceback comes along
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "faults.py" in str(error.__cause__)


def test_a_rank_that_hangs_fails_after_the_distributed_timeout(four_kv_heads, monkeypatch):
    """It never tells rank 0 it is joining (a script whose re-import blocks does this). The
    timeout leaves the rank time to start (a few seconds here): without the fault the engine
    would start."""
    monkeypatch.setenv(ENV_VAR, "1:start:hang")
    error, elapsed = failed_start(four_kv_heads, distributed_timeout_seconds=6)
    assert "rank 1 did not finish starting within 6 s (distributed_timeout_seconds)" in str(error)
    assert 6 <= elapsed < FAIL_FAST_S


def test_the_server_exits_with_the_rank_error_and_is_never_ready(four_kv_heads, monkeypatch,
                                                                  tmp_path):
    monkeypatch.setenv(ENV_VAR, "1:load:raise")
    server = ServerProcess(["--model", str(four_kv_heads), "--device", "cpu", "--state-size",
                            "6", "--max-num-seqs", "2", "--tensor-parallel-size", "2"],
                           tmp_path / "server.log")
    began = time.monotonic()
    try:
        while server.process.poll() is None and time.monotonic() - began < FAIL_FAST_S:
            try:
                ready = httpx.get(f"{server.url}/ready", timeout=1).status_code
            except httpx.TransportError:
                ready = None  # not listening: the engine is built before the server binds
            assert ready != 200
            time.sleep(0.2)
        code = server.process.poll()
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert code not in (None, 0), f"the server did not exit within {FAIL_FAST_S} s:\n{log}"
    assert "tensor-parallel rank 1 failed while loading its shard" in log
