"""The state store's tiers and budgets: the host tier spills to disk, the disk tier drops the
least recently used, a new store finds the files an old one left, a damaged file is a miss;
and the engine saves into it and continues from it by key."""

from __future__ import annotations

import pytest
import torch

from tova_engine import LLM, InvalidRequestError, SamplingParams, SnapshotSpec, StateSnapshot
from tova_engine.state.store import StateStore
from tova_engine.step.request import CoreRequest

SPEC = SnapshotSpec("m", "float32", 8, 8, "tova")


def snapshot(seed: int, entries: int = 8) -> StateSnapshot:
    g = torch.Generator().manual_seed(seed)
    k = tuple(torch.randn(2, entries, 4, generator=g) for _ in range(2))  # 2 layers
    v = tuple(torch.randn(2, entries, 4, generator=g) for _ in range(2))
    positions = tuple(torch.arange(entries) for _ in range(2))
    return StateSnapshot(SPEC, 10 + seed, [seed], k, v, positions)


SIZE = snapshot(0).nbytes  # 768 bytes


def same(a: StateSnapshot, b: StateSnapshot) -> bool:
    return a.num_seen == b.num_seen and all(
        torch.equal(x, y)
        for n in ("k", "v", "positions")
        for x, y in zip(getattr(a, n), getattr(b, n), strict=True)
    )


def test_host_tier_spills_to_disk_and_disk_tier_drops_the_least_recently_used(tmp_path):
    probe = tmp_path / "probe.safetensors"
    file_size = snapshot(0).save(probe, "probe")  # data and header
    probe.unlink()
    store = StateStore(host_bytes=2 * SIZE, disk_dir=tmp_path, disk_bytes=2 * file_size + 100)
    kept = {f"r{i}": snapshot(i) for i in range(5)}
    store.put("r0", kept["r0"])
    store.put("r1", kept["r1"])
    assert store.stats().host_snapshots == 2 and store.stats().disk_snapshots == 0
    store.put("r2", kept["r2"])  # r0 spills to disk
    assert store.stats().spills == 1 and store.stats().disk_snapshots == 1
    assert same(store.get("r0"), kept["r0"])  # read back from its file
    store.put("r3", kept["r3"])  # r1 spills; the disk holds r0, r1
    store.put("r4", kept["r4"])  # r2 spills: room for two, r0 (read before r1 came) goes
    stats = store.stats()
    assert stats.evictions == 1 and stats.disk_snapshots == 2 and stats.host_snapshots == 2
    assert store.get("r0") is None  # gone for good
    assert store.take_dropped() == ["r0"]
    for key in ("r1", "r2", "r3", "r4"):
        assert same(store.get(key), kept[key])
    assert store.stats().misses == 1 and store.stats().hits == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.safetensors", "r2.safetensors"]


def test_a_restarted_store_finds_its_files_in_their_order(tmp_path):
    first = StateStore(host_bytes=0, disk_dir=tmp_path, disk_bytes=10 * SIZE)
    for i in range(3):
        first.put(f"resp_{i}", snapshot(i))
    first.get("resp_0")  # now the most recently used
    again = StateStore(host_bytes=0, disk_dir=tmp_path, disk_bytes=10 * SIZE)
    assert [s.key for s in again.saved()] == ["resp_1", "resp_2", "resp_0"]
    assert [s.num_tokens for s in again.saved()] == [12, 13, 11]
    assert same(again.get("resp_2"), snapshot(2))


def test_odd_keys_and_damaged_files(tmp_path):
    store = StateStore(host_bytes=0, disk_dir=tmp_path, disk_bytes=10 * SIZE)
    store.put("../../etc/x y", snapshot(1))  # never a path of its own
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())
    assert StateStore(0, tmp_path, 10 * SIZE).saved()[0].key == "../../etc/x y"
    store.put("bad", snapshot(2))
    (tmp_path / "bad.safetensors").write_bytes(b"not a snapshot")
    assert store.get("bad") is None and "bad" not in store
    assert "bad" in store.take_dropped()


def test_without_a_disk_tier_what_the_host_pushes_out_is_gone():
    store = StateStore(host_bytes=SIZE)
    store.put("a", snapshot(1))
    store.put("b", snapshot(2))
    assert "a" not in store and "b" in store
    assert store.stats().evictions == 1 and store.take_dropped() == ["a"]
    assert not store.put("huge", snapshot(3, entries=16))  # larger than every tier


def test_the_engine_saves_and_continues_by_key(tiny_llama, tmp_path):
    llm = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu", max_num_seqs=4,
              state_store_dir=str(tmp_path))
    engine, core = llm.engine, llm.engine.core
    request = engine.build_request("resp_a", [5, 6, 7, 8], SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True, keep_state=True))
    engine.enqueue(request)
    saved = []
    while engine.has_unfinished_requests():
        step = core.step()
        if step is not None:
            saved += step.saved
    assert [s.key for s in saved] == ["resp_a"] and saved[0].num_tokens == 7
    follow = CoreRequest("resp_b", [9, 10], SamplingParams(max_tokens=2), 8, 2, "resp_a")
    core.add(follow)
    assert core._requests["resp_b"].prompt_token_ids[1:] == [9, 10]
    core.abort(["resp_b"])
    with pytest.raises(InvalidRequestError, match="deleted or expired") as info:
        core.add(CoreRequest("resp_c", [9], SamplingParams(), 8, 2, "resp_zzz"))
    assert info.value.param == "previous_response_id"
    core.drop_states(["resp_a"])
    assert "resp_a" not in core.store and not list(tmp_path.iterdir())


def test_async_engine_continues_stored_states_across_a_core_restart(tiny_llama, tmp_path):
    """Through the process boundary: the front end learns what the core saved, continues it
    by key, refuses unknown keys up front, and after the core is killed finds the states
    its disk tier kept."""
    import asyncio
    import os
    import signal
    import time

    from tova_engine import AsyncEngine, EngineConfig
    from tova_engine.errors import UnknownStateError
    from tova_engine.frontend.core_client import RestartPolicy

    config = EngineConfig(model=str(tiny_llama), dtype="float64", device="cpu", state_size=8,
                          max_num_seqs=4, state_store_memory_bytes=0,
                          state_store_dir=str(tmp_path))
    greedy = dict(temperature=0, ignore_eos=True, output_kind="final")
    offline = LLM(str(tiny_llama), state_size=8, dtype="float64", device="cpu", max_num_seqs=4)
    first = offline.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, keep_state=True,
                                                               **greedy), use_tqdm=False)[0]
    want = offline.generate([[11, 12]], SamplingParams(max_tokens=5, **greedy),
                            use_tqdm=False, resume_from=first.state)[0].outputs[0].token_ids

    async def run(engine, prompt, params, request_id=None, resume_key=None):
        prepared = engine.prepare(prompt, params, request_id, resume_key)
        async for out in engine.generate(prepared):
            last = out
        return last.outputs[0].token_ids

    engine = AsyncEngine(config, restart_policy=RestartPolicy(backoff_s=0.1))
    try:
        asyncio.run(run(engine, [5, 6, 7, 8, 9],
                        SamplingParams(max_tokens=4, keep_state=True, **greedy), "resp_1"))
        assert engine.saved_states["resp_1"].num_tokens == 9
        got = asyncio.run(run(engine, [11, 12], SamplingParams(max_tokens=5, **greedy),
                              resume_key="resp_1"))
        assert got == want
        with pytest.raises(UnknownStateError) as info:
            engine.prepare([1], SamplingParams(), resume_key="resp_nope")
        assert info.value.param == "previous_response_id"
        os.kill(engine.core_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while engine.restarts < 1 or not engine.is_ready:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "resp_1" in engine.saved_states  # from the disk tier
        got = asyncio.run(run(engine, [11, 12], SamplingParams(max_tokens=5, **greedy),
                              resume_key="resp_1"))
        assert got == want
        engine.drop_states(["resp_1"])
        assert "resp_1" not in engine.saved_states
        deadline = time.monotonic() + 10
        while list(tmp_path.iterdir()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        engine.shutdown()
