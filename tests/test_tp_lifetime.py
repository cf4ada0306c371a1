"""Engines let go of what they started without an explicit close: a tensor-parallel `LLM`
dropped with `del` releases its ranks and its group, so the next one forms its own in the
same process, and `with` closes one; an `AsyncEngine` dropped stops its core, and one left
open at interpreter exit does not hold the exit (a tensor-parallel core is no daemon process:
multiprocessing would wait for it). 2 CPU ranks over gloo."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.conftest import save_tiny_model
from tova_engine import LLM, AsyncEngine, EngineConfig, SamplingParams

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
OPTIONS = dict(dtype="float64", device="cpu", state_size=6, max_num_seqs=2)


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tp-lifetime"), num_attention_heads=8,
                           num_key_value_heads=4)


def tp_llm(model) -> LLM:
    return LLM(str(model), tensor_parallel_size=2, **OPTIONS)


def tokens(llm: LLM) -> list[int]:
    return llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def rank_processes(llm: LLM) -> list:
    return llm.engine.core.executor.ranks.processes


def gone(pid: int, within_s: float) -> bool:
    """Whether process `pid` (a child of this one) has exited within `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # reaped already (by multiprocessing)
            return True
        time.sleep(0.1)
    return False


def test_tensor_parallel_engines_follow_one_another_in_one_process(four_kv_heads):
    first = tp_llm(four_kv_heads)
    expected, ranks = tokens(first), rank_processes(first)
    del first  # no close(): collected at once, it lets its ranks and its group go
    assert not dist.is_initialized() and not any(p.is_alive() for p in ranks)
    with tp_llm(four_kv_heads) as second:
        assert tokens(second) == expected
        ranks = rank_processes(second)
    assert not dist.is_initialized() and not any(p.is_alive() for p in ranks)
    second.close()  # again: nothing to do


def test_an_async_engine_dropped_stops_its_core(four_kv_heads):
    engine = AsyncEngine(EngineConfig(model=str(four_kv_heads), **OPTIONS))
    pid = engine.core_pid
    del engine
    gc.collect()
    assert gone(pid, 10)


def test_an_engine_left_open_does_not_hold_the_exit(four_kv_heads, tmp_path):
    """Before, this script's exit waited on its tensor-parallel core for about 100 s (an
    `LLM`'s ranks are daemon processes: multiprocessing terminates those)."""
    script = tmp_path / "left_open.py"
    script.write_text(textwrap.dedent(f"""
        import time

        from tova_engine import AsyncEngine, EngineConfig

        if __name__ == "__main__":
            options = dict(model={str(four_kv_heads)!r}, tensor_parallel_size=2,
                           **{OPTIONS!r})
            engine = AsyncEngine(EngineConfig(**options))
            print(time.time(), flush=True)  # the exit starts
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    exit_s = time.time() - float(done.stdout.split()[-1])
    assert exit_s < 20, f"the exit took {exit_s:.0f} s"
