"""Per-slot penalty counts kept on the device, against the reference rebuilt from token lists:
the counts themselves, the sampler step after step, and the engine end to end."""

from __future__ import annotations

import pytest
import torch

from tova_engine import EngineConfig, LLMEngine, SamplingParams
from tova_engine.execution.penalty_counts import PenaltyCounts, counts_from_lists
from tova_engine.execution.sampler import Sampler, SampleRow, apply_penalties, make_generator

VOCAB = 40


def assert_same_counts(counts: PenaltyCounts, slots: list[int], prompts, outputs) -> None:
    got = counts.gather(torch.tensor(slots))
    ref = counts_from_lists(prompts, outputs, VOCAB, torch.device("cpu"))
    assert torch.equal(got.output, ref.output)
    assert torch.equal(got.in_prompt, ref.in_prompt)


def test_reset_add_copy_match_the_lists():
    counts = PenaltyCounts(4, VOCAB, torch.device("cpu"))
    assert not counts.allocated
    counts.reset(2, [3, 3, 7])
    counts.reset(0, None)
    counts.add(torch.tensor([2, 0]), torch.tensor([5, 5]))
    counts.add(torch.tensor([2]), torch.tensor([7]))
    counts.copy(2, 3)  # a fork: slot 3 continues from slot 2 and counts its own tokens
    counts.add(torch.tensor([3, 2]), torch.tensor([1, 5]))
    assert_same_counts(
        counts, [2, 0, 3], [[3, 3, 7], [], [3, 3, 7]], [[5, 7, 5], [5], [5, 7, 1]]
    )
    counts.reset(3, None)  # reused by a request without repetition penalty
    assert_same_counts(counts, [3, 2], [[], [3, 3, 7]], [[], [5, 7, 5]])


def test_batch_without_penalties_never_allocates():
    counts = PenaltyCounts(4, VOCAB, torch.device("cpu"))
    params = SamplingParams(temperature=0.0)
    rows = [SampleRow(params, [1], [2, 2], None, (), slot) for slot in (0, 3)]
    Sampler()(torch.randn(2, VOCAB), rows, counts)
    assert not counts.allocated


# ----- the sampler, step after step ----------------------------------------------------------

PARAMS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7),
    SamplingParams(temperature=0.0),  # no penalties: the others run on a subset of the rows
    SamplingParams(seed=11, presence_penalty=1.5, repetition_penalty=0.6),
    SamplingParams(seed=12, frequency_penalty=-0.4, top_k=8),
]
PROMPTS = [[1, 2, 2, 9], [4], [7, 7, 7], [30, 31]]
SLOTS = [5, 1, 3, 0]


def sampler_rows(outputs, generators, slots) -> list[SampleRow]:
    return [
        SampleRow(params, prompt, output, generator, (), slot)
        for params, prompt, output, generator, slot
        in zip(PARAMS, PROMPTS, outputs, generators, slots, strict=True)
    ]


def generators() -> list[torch.Generator | None]:
    return [make_generator(p.seed, 0, "cpu") if p.seed is not None else None for p in PARAMS]


@pytest.mark.parametrize("rows_used", [[0, 1, 2, 3], [0, 2, 3]])
def test_sampler_device_counts_match_lists(rows_used):
    counts = PenaltyCounts(6, VOCAB, torch.device("cpu"))
    for i in rows_used:
        counts.reset(SLOTS[i], PROMPTS[i] if PARAMS[i].repetition_penalty != 1.0 else None)
    device_sampler, list_sampler = Sampler(3), Sampler(3)
    device_gens, list_gens = generators(), generators()
    outputs: list[list[int]] = [[] for _ in PARAMS]
    logits_gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        # Sharp logits over few tokens: penalised tokens lose the argmax, so outputs differ.
        logits = torch.randn(len(rows_used), VOCAB, generator=logits_gen) * 0.5
        pick = lambda rows: [rows[i] for i in rows_used]  # noqa: E731
        with_slots = pick(sampler_rows(outputs, device_gens, SLOTS))
        with_lists = pick(sampler_rows(outputs, list_gens, [None] * len(PARAMS)))
        assert torch.equal(
            apply_penalties(logits, with_slots, counts), apply_penalties(logits, with_lists)
        )
        got = device_sampler(logits, with_slots, counts).token_ids.tolist()
        assert got == list_sampler(logits, with_lists).token_ids.tolist()
        for i, token in zip(rows_used, got, strict=True):
            outputs[i].append(token)
    # The penalties did bite: the greedy row with them repeats less than the one without.
    assert len(set(outputs[0])) > 10


# ----- the engine ----------------------------------------------------------------------------

class ListSampler(Sampler):
    """The reference: penalties rebuilt from the sequences' token lists at every step."""

    def __call__(self, logits, rows, counts=None):
        return super().__call__(logits, rows)


def runner_of(engine: LLMEngine):
    # The runner lives in the engine core once LLMEngine is split into front end and core.
    return engine.core.executor.worker.runner if hasattr(engine, "core") else engine.runner


def engine_requests() -> list[tuple[list[int], SamplingParams]]:
    """More sequences than slots, so later requests reuse slots (and their counts)."""
    def params(**extra) -> SamplingParams:
        return SamplingParams(max_tokens=24, ignore_eos=True, output_kind="final", **extra)

    penalties = dict(repetition_penalty=1.6, frequency_penalty=1.0, presence_penalty=0.5)
    return [
        ([12, 13, 14, 15], params(temperature=0.0, **penalties)),
        ([9, 10, 11], params(n=2, seed=4, **penalties)),  # forked choices count their own
        ([12, 13, 14, 15], params(temperature=0.0)),  # no penalties, sharing the batch
        ([5, 6, 5, 7, 8], params(temperature=0.0, repetition_penalty=3.0)),  # the prompt counts
        ([20, 21], params(n=3, temperature=0.9, frequency_penalty=1.5)),  # unseeded, reused slots
    ]


def run_engine(model_dir, sampler: Sampler | None = None) -> dict[str, list[list[int]]]:
    engine = LLMEngine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", state_size=8, max_num_seqs=3,
        prefill_chunk_size=4,
    ))
    if sampler is not None:
        runner_of(engine).sampler = sampler
    for i, (prompt, params) in enumerate(engine_requests()):
        engine.add_request(f"r{i}", prompt, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = [choice.token_ids for choice in out.outputs]
    assert runner_of(engine).penalty_counts.allocated
    return tokens


def test_engine_device_counts_match_list_reference(tiny_llama):
    got = run_engine(tiny_llama)
    assert got == run_engine(tiny_llama, ListSampler(0, "cpu"))
    assert len(got) == 5 and all(len(t) == 24 for choices in got.values() for t in choices)
    # Same prompt, greedy: without penalties r2 loops on a token, r0 does not.
    assert len(set(got["r2"][0])) < 20 and len(set(got["r0"][0])) == 24
