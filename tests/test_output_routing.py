"""The core's output router (several front ends): each step cut per front end, against the
step itself as the reference; engine-wide parts to every front end."""

from __future__ import annotations

import pytest

from tova_engine.core.messages import (
    PromptLogprobs,
    RequestFailure,
    SequenceFinish,
    StepOutputs,
    StepStats,
)
from tova_engine.core.routing import OutputRouter
from tova_engine.state.store import StoreStats


def step_of(rows: list[tuple[str, int, int]], admitted: list[str] = (), **fields) -> StepOutputs:
    step = StepOutputs(1.0, list(admitted), [r[0] for r in rows], [r[1] for r in rows],
                       [r[2] for r in rows], **fields)
    step.logprobs = [-float(token) for _, _, token in rows]
    step.ranks = [token + 1 for _, _, token in rows]
    return step


def test_one_front_end_gets_the_step_whole():
    router = OutputRouter(1)
    router.register("a", 0, 1)
    step = step_of([("a", 0, 5)])
    assert router.split(step) == [step]


def test_each_front_end_gets_its_own_rows_in_order_and_every_one_the_engine_wide_parts():
    router = OutputRouter(3)
    router.register("a", 0, 1)
    router.register("b", 1, 2)
    router.register("c", 0, 1)
    stats = StepStats("decode", 0.01, 4, 0, 4, [], 3, 0, 4)
    store = StoreStats()
    rows = [("a", 0, 10), ("b", 0, 11), ("b", 1, 12), ("c", 0, 13), ("gone", 0, 14)]
    step = step_of(rows, stats=stats, store=store, dropped=["old"], admitted=["b", "c"],
                   cached_tokens={"b": 512},
                   prompt_logprobs=[PromptLogprobs("c", 1, [-0.5], [1], [], [])])
    parts = router.split(step)
    assert len(parts) == 3
    for client, part in enumerate(parts):
        mine = [r for r in rows if router.owner(r[0]) == client]
        assert part.request_ids == [r[0] for r in mine]
        assert part.indexes == [r[1] for r in mine]
        assert part.token_ids == [r[2] for r in mine]
        if mine:  # a part without rows leaves the optional columns out
            assert part.logprobs == [-float(r[2]) for r in mine]
            assert part.ranks == [r[2] + 1 for r in mine]
        # Every front end's metrics and admission read the step's stats and store changes.
        assert part.stats is stats and part.store is store and part.dropped == ["old"]
    assert parts[0].admitted == ["c"] and parts[1].admitted == ["b"]
    assert parts[1].cached_tokens == {"b": 512} and parts[0].cached_tokens == {}
    assert [p.request_id for p in parts[0].prompt_logprobs] == ["c"]
    assert parts[2].request_ids == [] and parts[2].logprobs is None


def test_a_request_is_forgotten_once_every_choice_finished_or_it_failed():
    router = OutputRouter(2)
    router.register("n2", 1, 2)
    router.register("bad", 0, 1)
    first = router.split(StepOutputs(0.0, [], [], [], [],
                                     finished=[SequenceFinish("n2", 0, "length")],
                                     failed=[RequestFailure("bad", "boom")]))
    assert [f.request_id for f in first[1].finished] == ["n2"]
    assert [f.request_id for f in first[0].failed] == ["bad"]
    assert router.owner("n2") == 1 and router.owner("bad") is None
    last = router.split(StepOutputs(0.0, [], [], [], [],
                                    finished=[SequenceFinish("n2", 1, "stop")]))
    assert [f.index for f in last[1].finished] == [1]
    assert router.owner("n2") is None


def test_a_dead_front_ends_requests_and_bad_indexes():
    router = OutputRouter(2)
    for rid, client in (("a", 0), ("b", 1), ("c", 0)):
        router.register(rid, client, 1)
    assert sorted(router.requests_of([0])) == ["a", "c"]
    assert router.requests_of([1]) == ["b"]
    with pytest.raises(ValueError, match="client"):
        router.register("d", 2, 1)
    with pytest.raises(ValueError, match="clients"):
        OutputRouter(0)
