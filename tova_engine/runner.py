"""The one place that builds tensors for a step: runs the model over the scheduled tokens,
computes prompt log-probabilities, forks n > 1 choices and samples."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tova_engine.logprobs import TokenLogprobs, token_logprobs
from tova_engine.model.llama import LlamaModel
from tova_engine.policies import Policy
from tova_engine.request import Request, Sequence
from tova_engine.sampler import Sampler, SampleRow
from tova_engine.scheduler import PrefillChunk, SchedulerOutput
from tova_engine.state import KVState
from tova_engine.state_attention import ChunkAttention, DecodeAttention


class SampledTokens(NamedTuple):
    """Host-side results for the sequences that sampled this step, in order."""

    sequences: list[Sequence]
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    finite: list[bool]


class StepResult(NamedTuple):
    sampled: SampledTokens
    # request -> logprobs of the prompt tokens this step predicted: (first index, values)
    prompt_logprobs: dict[str, tuple[int, TokenLogprobs]]
    evicted_ages: list[int]


class _Pending(NamedTuple):
    """Logits rows that feed the sampler, and the sequences that sample from each."""

    logits: torch.Tensor
    sequences: list[Sequence]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        state: KVState,
        policy: Policy,
        sampler: Sampler,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.model = model
        self.state = state
        self.policy = policy
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.device = state.num_seen.device

    def execute(self, scheduled: SchedulerOutput) -> StepResult:
        for request in scheduled.admitted:
            for seq in request.sequences:
                self.state.reset_slot(seq.slot, request.capacity)
        pending: list[_Pending] = []
        prompt_logprobs: dict[str, tuple[int, TokenLogprobs]] = {}
        evicted: list[torch.Tensor] = []
        single = [c for c in scheduled.prefills if c.length == 1]
        if scheduled.decodes or single:
            self._run_single_tokens(scheduled.decodes, single, pending, prompt_logprobs, evicted)
        for chunk in scheduled.prefills:
            if chunk.length > 1:
                self._run_chunk(chunk, pending, prompt_logprobs, evicted)
        ages = torch.cat([a.flatten() for a in evicted]) if evicted else torch.empty(0)
        return StepResult(self._sample(pending), prompt_logprobs, ages[ages >= 0].tolist())

    def _run_single_tokens(self, decodes, chunks, pending, prompt_logprobs, evicted) -> None:
        """Decodes and one-token prefill chunks share one batched forward: for the state a
        prompt token fed alone is exactly a decode step."""
        token_ids = [seq.output_token_ids[-1] for seq in decodes]
        token_ids += [c.request.prompt_token_ids[c.start] for c in chunks]
        slots = [seq.slot for seq in decodes] + [c.request.leader.slot for c in chunks]
        # Tokens already in each row (the newest sampled token is not fed yet), from the
        # host-side counters: attention then spans only the entries in use.
        seen = [seq.request.prompt_len + len(seq.output_token_ids) - 1 for seq in decodes]
        seen += [c.start for c in chunks]
        capacities = [seq.request.capacity for seq in decodes]
        capacities += [c.request.capacity for c in chunks]
        width = max(min(n, cap) for n, cap in zip(seen, capacities, strict=True)) + 1
        attend = DecodeAttention(self.state, self.policy, slots, width)
        hidden = self.model(self._ids(token_ids), attend.positions, attend)
        attend.finish()
        evicted.extend(attend.evicted_ages)
        logits = self.model.compute_logits(hidden)
        pending.extend(_Pending(logits[i], [seq]) for i, seq in enumerate(decodes))
        for row, chunk in enumerate(chunks, start=len(decodes)):
            self._after_chunk(chunk, logits[row : row + 1], pending, prompt_logprobs)

    def _run_chunk(self, chunk: PrefillChunk, pending, prompt_logprobs, evicted) -> None:
        request = chunk.request
        entries = min(chunk.start, request.capacity)
        attend = ChunkAttention(
            self.state, self.policy, request.leader.slot, entries, chunk.start, chunk.length
        )
        token_ids = request.prompt_token_ids[chunk.start : chunk.start + chunk.length]
        hidden = self.model(self._ids(token_ids), attend.positions, attend)
        attend.finish()
        evicted.extend(attend.evicted_ages)
        # Logits only where they are used: every position for prompt logprobs, else the last.
        wants_all = request.params.prompt_logprobs is not None
        logits = self.model.compute_logits(hidden if wants_all else hidden[-1:])
        self._after_chunk(chunk, logits, pending, prompt_logprobs)

    def _after_chunk(self, chunk: PrefillChunk, logits, pending, prompt_logprobs) -> None:
        """logits: [C, V] for every chunk position, or [1, V] for the last one only."""
        request = chunk.request
        k = request.params.prompt_logprobs
        if k is not None:
            # Position p predicts prompt token p + 1; the last prompt position predicts none.
            first = chunk.start + 1
            targets = request.prompt_token_ids[first : chunk.start + chunk.length + 1]
            if targets:
                rows = logits[: len(targets)]
                prompt_logprobs[request.request_id] = (
                    first,
                    token_logprobs(rows, self._ids(targets), k),
                )
        if chunk.completes_prompt and request.max_tokens > 0:
            for seq in request.sequences[1:]:
                self.state.copy_slot(request.leader.slot, seq.slot)
            pending.append(_Pending(logits[-1], list(request.sequences)))

    def _sample(self, pending: list[_Pending]) -> SampledTokens:
        sequences = [seq for p in pending for seq in p.sequences]
        if not sequences:
            return SampledTokens([], [], [], [], None, None, [])
        logits = torch.stack([p.logits for p in pending for _ in p.sequences])
        rows = [self._sample_row(seq) for seq in sequences]
        out = self.sampler(logits, rows)
        return SampledTokens(
            sequences,
            out.token_ids.tolist(),
            out.logprobs.tolist(),
            out.ranks.tolist(),
            None if out.top_token_ids is None else out.top_token_ids.tolist(),
            None if out.top_logprobs is None else out.top_logprobs.tolist(),
            out.finite.tolist(),
        )

    def _sample_row(self, seq: Sequence) -> SampleRow:
        request = seq.request
        params = request.params
        blocked: tuple[int, ...] = ()
        if len(seq.output_token_ids) < params.min_tokens:
            blocked = (*self.eos_token_ids, *params.stop_token_ids)
        return SampleRow(
            params, request.prompt_token_ids, seq.output_token_ids, seq.generator, blocked
        )

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64, device=self.device)


def requests_of(scheduled: SchedulerOutput) -> list[Request]:
    """Every request that had work in a step (for failing them together if the step raises)."""
    seen: dict[int, Request] = {}
    for seq in scheduled.decodes:
        seen[id(seq.request)] = seq.request
    for chunk in scheduled.prefills:
        seen[id(chunk.request)] = chunk.request
    return list(seen.values())
