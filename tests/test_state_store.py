"""The state store's tiers and budgets: every state is written through to the directory, the
host tier caches them, the disk tier drops the least recently used, a new store finds the files
an old one left, stores sharing a directory see each other's writes and deletions, a damaged
file is a miss; and the engine saves into it and continues from it by key."""

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


def test_every_state_is_written_through_and_the_disk_tier_drops_the_least_recently_used(
        tmp_path):
    probe = tmp_path / "probe.safetensors"
    file_size = snapshot(0).save(probe, "probe")  # data and header
    probe.unlink()
    store = StateStore(host_bytes=2 * SIZE, disk_dir=tmp_path, disk_bytes=3 * file_size + 100)
    kept = {f"r{i}": snapshot(i) for i in range(4)}
    store.put("r0", kept["r0"])
    store.put("r1", kept["r1"])
    stats = store.stats()
    assert (stats.host_snapshots, stats.disk_snapshots) == (2, 2)  # written at once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0.safetensors", "r1.safetensors"]
    store.put("r2", kept["r2"])  # the host tier lets r0 go; its file stays
    stats = store.stats()
    assert (stats.host_snapshots, stats.disk_snapshots, stats.spills) == (2, 3, 1)
    assert same(store.get("r0"), kept["r0"])  # read back from its file
    store.put("r3", kept["r3"])  # room for three files: r1 (used before r0 was read) goes
    stats = store.stats()
    assert stats.evictions == 1 and stats.disk_snapshots == 3 and stats.host_snapshots == 2
    assert store.get("r1") is None  # gone for good, from the host tier too
    assert store.take_dropped() == ["r1"]
    for key in ("r0", "r2", "r3"):
        assert same(store.get(key), kept[key])
    assert store.stats().misses == 1 and store.stats().hits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "r0.safetensors", "r2.safetensors", "r3.safetensors"]


def test_stores_sharing_a_directory_see_each_others_writes_and_deletions(tmp_path):
    """Two engines (replicas) on one directory: a key one wrote is found by the other, a
    deletion by one is seen by the other even where its host tier held a copy, a key
    written again is read again, and a state too large for the disk stays in host memory."""
    a = StateStore(host_bytes=10 * SIZE, disk_dir=tmp_path, disk_bytes=10 * SIZE)
    b = StateStore(host_bytes=10 * SIZE, disk_dir=tmp_path, disk_bytes=10 * SIZE)
    a.put("resp_1", snapshot(1))
    assert "resp_1" not in b and same(b.get("resp_1"), snapshot(1))  # looked up on a miss
    assert b.stats().hits == 1 and "resp_1" in b
    assert b.delete("resp_1")  # a's file, a's host copy
    assert not (tmp_path / "resp_1.safetensors").exists()
    assert a.get("resp_1") is None and "resp_1" not in a
    assert a.take_dropped() == ["resp_1"]
    a.put("resp_2", snapshot(2))
    assert same(a.get("resp_2"), snapshot(2))
    b.put("resp_2", snapshot(3))  # written again elsewhere: a's cached copy is stale
    assert same(a.get("resp_2"), snapshot(3))
    assert b.pop("resp_2") is not None and a.get("resp_2") is None
    assert not b.delete("resp_never")
    small = StateStore(host_bytes=10 * SIZE, disk_dir=tmp_path / "small", disk_bytes=SIZE // 2)
    assert small.put("resp_big", snapshot(4))  # no file: host memory only, and that is no loss
    assert same(small.get("resp_big"), snapshot(4)) and not list((tmp_path / "small").iterdir())


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
