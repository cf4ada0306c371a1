"""The one place that builds tensors for a step: runs the model over the scheduled tokens,
computes prompt log-probabilities, forks n > 1 choices and samples.

On CUDA the one-token rows of a step (decodes and one-token prefill chunks) replay a captured
CUDA graph (`decode_graphs.py`) or run the fused Triton attention eagerly; on CPU they run the
PyTorch `DecodeAttention`. Whatever the host needs back from a step (sampled tokens, their
log-probs, prompt log-probs, evicted ages) travels in one device-to-host copy at the end.

A step is `launch`ed (its work queued, its read-back started) and later `collect`ed (the
read-back awaited). A decode row's input token comes from the device (`last_tokens`, written
by the sampler), so the next step can be launched before the host has seen this step's
tokens: the engine core overlaps its host work with the GPU that way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tova_engine.attention.backend import AttentionBackend
from tova_engine.attention.fused import FusedDecodeAttention
from tova_engine.attention.packed import PackedAttention
from tova_engine.attention.pytorch import DecodeAttention
from tova_engine.execution.chunk_forward import (
    chunk_attention,
    forward_chunks,
    shape_of,
    start_of,
)
from tova_engine.execution.decode_graphs import DecodeGraphs
from tova_engine.execution.logprobs import TokenLogprobs, TokenLogprobTensors, token_logprob_tensors
from tova_engine.execution.penalty_counts import PenaltyCounts
from tova_engine.execution.prefill_graphs import PrefillGraphs
from tova_engine.execution.sampler import Sampler, SamplerOutput, SampleRow, uses_penalties
from tova_engine.execution.state_shards import own_heads
from tova_engine.model.llama import LlamaModel
from tova_engine.parallel import SINGLE, TensorParallel
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy
from tova_engine.step.batch import PrefillChunk, SchedulerOutput
from tova_engine.step.request import Sequence
from tova_engine.transfer import HostCopy, to_device


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
    """Logits that feed the sampler: [R, V] with one row per sequence (decodes), or [1, V]
    that all of `sequences` sample from (the choices of a prompt just prefilled)."""

    logits: torch.Tensor
    sequences: list[Sequence]


class _PromptLogprobs(NamedTuple):
    """A request's prompt log-probs computed this step, still on the device."""

    request_id: str
    first: int  # index of the first prompt token they are for
    values: TokenLogprobTensors


class InFlight(NamedTuple):
    """A launched step: what its read-back will be unpacked into."""

    sequences: list[Sequence]  # the rows that sampled, in order
    sampled: SamplerOutput | None
    prompt: list[_PromptLogprobs]
    has_ages: bool
    copy: HostCopy


class _StepTensors(NamedTuple):
    """What a step produced on the device, before the single read-back."""

    pending: list[_Pending]
    prompt: list[_PromptLogprobs]
    # Evicted ages, any shape; negative entries mean "nothing evicted".
    ages: list[torch.Tensor]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        state: KVState,
        policy: Policy,
        sampler: Sampler,
        eos_token_ids: frozenset[int],
        fused_attention: bool = False,
        graphs: DecodeGraphs | None = None,
        prefill_graphs: PrefillGraphs | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """fused_attention: decode rows through the Triton kernels (CUDA); graphs: replay
        captured decode steps for batches up to their largest size; prefill_graphs: replay
        prefill chunk groups whose shape recurs."""
        self.model = model
        self.state = state
        self.policy = policy
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.fused_attention = fused_attention
        self.graphs = graphs
        self.prefill_graphs = prefill_graphs
        # A step's eager forwards (its one-token rows, its chunk groups) run as one.
        self.pack_steps = True
        # Under tensor parallelism rank 0 samples and sends the tokens to the other ranks.
        self.tp = tp
        self.device = state.num_seen.device
        # One row per state slot, allocated by the first request with penalties.
        self.penalty_counts = PenaltyCounts(
            state.num_seen.shape[0], model.config.vocab_size, self.device
        )
        # Per slot, the token sampled last: the input of the slot's next decode row.
        self.last_tokens = torch.zeros(
            state.num_seen.shape[0], dtype=torch.int64, device=self.device
        )

    def launch(self, scheduled: SchedulerOutput) -> InFlight:
        """Queue the step's work and its read-back; returns before the device is done."""
        for request in scheduled.admitted:
            recent = self.policy.with_protect_recent(request.params.protect_recent).recent_count(
                request.capacity
            )
            for seq in request.sequences:
                if request.resume is not None:  # n = 1; this rank's heads of it
                    resume = own_heads(request.resume, self.tp, self.state.k[0].shape[1])
                    self.state.restore(seq.slot, resume, recent)
                else:
                    self.state.reset_slot(seq.slot, request.capacity, recent)
            params = request.params
            if uses_penalties(params):  # the other choices' counts are copied at the fork
                prompt = request.prompt_token_ids if params.repetition_penalty != 1.0 else None
                self.penalty_counts.reset(request.leader.slot, prompt)
        for chunk in scheduled.prefills:  # a cached prefix's state, then the rest of the prompt
            if chunk.restore_from is not None:
                self.state.copy_slot(chunk.restore_from, chunk.request.leader.slot)
        step = _StepTensors([], [], [])
        single = [c for c in scheduled.prefills if c.length == 1]
        longer = [c for c in scheduled.prefills if c.length > 1]
        logits: dict[int, torch.Tensor] = {}
        eager = []
        for group in _chunk_groups(longer):
            replayed = self._replay_chunks(group, step)
            if replayed is None:
                eager.append(group)
            else:
                logits.update(zip(map(id, group), replayed, strict=True))
        # Groups that want every position's logits run alone; the rest share one forward
        # with the one-token rows when there is more than one forward to share.
        packed = [g for g in eager if not _wants_all(g)] if self.pack_steps else []
        if packed and (scheduled.decodes or single or len(packed) > 1):
            logits.update(self._run_packed(scheduled.decodes, single, packed, step))
            eager = [g for g in eager if _wants_all(g)]
        elif scheduled.decodes or single:
            self._run_single_tokens(scheduled.decodes, single, step)
        for group in eager:
            logits.update(zip(map(id, group), self._run_chunks(group, step), strict=True))
        for chunk in longer:  # back in schedule order: the rows the sampler sees keep it
            self._after_chunk(chunk, logits[id(chunk)], step)
        for chunk in scheduled.prefills:  # queued behind the chunk: its state at a boundary
            if chunk.save_to is not None:
                self.state.copy_slot(chunk.request.leader.slot, chunk.save_to)
        return self._start_read_back(step)

    def _run_single_tokens(self, decodes, chunks, step: _StepTensors) -> None:
        """Decodes and one-token prefill chunks share one batched forward: for the state a
        prompt token fed alone is exactly a decode step."""
        slots = [seq.slot for seq in decodes] + [c.request.leader.slot for c in chunks]
        token_ids = self._single_token_inputs(decodes, chunks)
        if self.graphs is not None and len(slots) <= self.graphs.max_batch_size:
            logits, ages = self.graphs.run(token_ids, slots)
        else:
            attend = self._decode_attention(decodes, chunks, slots)
            hidden = self.model(token_ids, attend.positions, attend)
            attend.finish()
            logits = self.model.compute_logits(hidden)
            ages = attend.evicted_ages
        if ages is not None:
            step.ages.append(ages)
        self._after_single_tokens(decodes, chunks, logits, step)

    def _after_single_tokens(self, decodes, chunks, logits, step: _StepTensors) -> None:
        """logits: a row per decode, then one per one-token chunk (more rows may follow)."""
        if decodes:  # one block: no per-row views to build and stack
            step.pending.append(_Pending(logits[: len(decodes)], list(decodes)))
        for row, chunk in enumerate(chunks, start=len(decodes)):
            self._after_chunk(chunk, logits[row : row + 1], step)

    def _single_token_inputs(self, decodes, chunks) -> torch.Tensor:
        """[B] input ids: decodes read their slot's last sampled token on the device (the
        host may not have it yet); one-token prefill chunks feed their prompt token."""
        parts = []
        if decodes:
            parts.append(self.last_tokens[self._ids([seq.slot for seq in decodes])])
        if chunks:
            parts.append(self._ids([c.request.prompt_token_ids[c.start] for c in chunks]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_attention(self, decodes, chunks, slots: list[int]):
        if self.fused_attention:
            return FusedDecodeAttention(
                self.state, self.policy, to_device(slots, torch.int64, self.device)
            )
        # Tokens already in each row (the newest sampled token is not fed yet), from the
        # host-side counters: attention then spans only the entries in use.
        seen = [
            seq.request.position_offset + seq.request.prompt_len + seq.num_sampled - 1
            for seq in decodes
        ]
        seen += [c.position for c in chunks]
        capacities = [seq.request.capacity for seq in decodes]
        capacities += [c.request.capacity for c in chunks]
        width = max(min(n, cap) for n, cap in zip(seen, capacities, strict=True)) + 1
        return DecodeAttention(self.state, self.policy, slots, width)

    def _replay_chunks(self, chunks: list[PrefillChunk], step: _StepTensors):
        """A group's logits ([1, V] per chunk) from its captured graph; None when the group
        runs eagerly (no graph for its shape yet, or it wants every position's logits)."""
        if self.prefill_graphs is None or _wants_all(chunks):
            return None
        replayed = self.prefill_graphs.run(chunks)
        if replayed is None:
            return None
        logits, ages = replayed
        if ages is not None:
            step.ages.append(ages)
        return [logits[i : i + 1] for i in range(len(chunks))]

    def _run_chunks(self, chunks: list[PrefillChunk], step: _StepTensors) -> list[torch.Tensor]:
        """One eager forward for chunks at the same point of their prompts; returns each
        chunk's logits: [C, V] for every position when it wants prompt log-probs, else
        [1, V]."""
        wants_all = _wants_all(chunks)  # such a chunk runs alone
        token_ids = self._ids([token for c in chunks for token in c.token_ids])
        slots = [c.request.leader.slot for c in chunks]
        logits, ages = forward_chunks(
            self.model, self.state, self.policy, token_ids, slots, shape_of(chunks),
            start_of(chunks), every_position=wants_all,
        )
        if ages is not None:
            step.ages.append(ages)
        if wants_all:
            return [logits]
        return [logits[i : i + 1] for i in range(len(chunks))]

    def _run_packed(self, decodes, single, groups, step: _StepTensors) -> dict[int, torch.Tensor]:
        """The one-token rows and the chunk groups in one forward (attention/packed.py).
        Returns each chunk's logits at its last position ([1, V]) by id."""
        parts: list[AttentionBackend] = []
        inputs = []
        ones = len(decodes) + len(single)
        if ones:
            slots = [seq.slot for seq in decodes] + [c.request.leader.slot for c in single]
            parts.append(self._decode_attention(decodes, single, slots))
            inputs.append(self._single_token_inputs(decodes, single))
        picked = list(range(ones))  # the hidden rows that need logits
        chunks, offset = [], ones
        for group in groups:
            shape = shape_of(group)
            slots = [c.request.leader.slot for c in group]
            parts.append(chunk_attention(self.state, self.policy, slots, shape, start_of(group)))
            inputs.append(self._ids([token for c in group for token in c.token_ids]))
            for chunk in group:  # its last position
                offset += shape.length
                picked.append(offset - 1)
                chunks.append(chunk)
        attend = PackedAttention(parts)
        hidden = self.model(torch.cat(inputs), attend.positions, attend)
        attend.finish()
        logits = self.model.compute_logits(hidden[self._ids(picked)])
        ages = attend.evicted_ages
        if ages is not None:
            step.ages.append(ages)
        self._after_single_tokens(decodes, single, logits, step)
        return {id(chunk): logits[row : row + 1]
                for row, chunk in enumerate(chunks, start=ones)}

    def _after_chunk(self, chunk: PrefillChunk, logits, step: _StepTensors) -> None:
        """logits: [C, V] for every chunk position, or [1, V] for the last one only."""
        request = chunk.request
        k = request.params.prompt_logprobs
        if k is not None:
            # Position p predicts prompt token p + 1; the last prompt position predicts none.
            first = chunk.start + 1
            targets = request.prompt_token_ids[first : chunk.start + chunk.length + 1]
            if targets:
                values = token_logprob_tensors(logits[: len(targets)], self._ids(targets), k)
                step.prompt.append(_PromptLogprobs(request.request_id, first, values))
        if chunk.completes_prompt and request.max_tokens > 0:
            counted = uses_penalties(request.params)
            for seq in request.sequences[1:]:
                self.state.copy_slot(request.leader.slot, seq.slot)
                if counted:
                    self.penalty_counts.copy(request.leader.slot, seq.slot)
            step.pending.append(_Pending(logits[-1:], list(request.sequences)))

    def _start_read_back(self, step: _StepTensors) -> InFlight:
        """Sample, keep each row's token as its slot's next input, and start bringing every
        result of the step to the host in one copy."""
        sequences = [seq for p in step.pending for seq in p.sequences]
        sampled = self._sample(step.pending, sequences) if self.tp.rank == 0 else None
        tensors = []
        if sequences:
            if sampled is not None:
                tensors = _sampler_tensors(sampled)
                token_ids = sampled.token_ids
            else:
                token_ids = torch.empty(len(sequences), dtype=torch.int64, device=self.device)
            self.tp.broadcast(token_ids)  # every rank feeds the same tokens next step
            slots = self._ids([seq.slot for seq in sequences])
            self.last_tokens.index_copy_(0, slots, token_ids)
            for seq in sequences:
                seq.num_sampled += 1
        for prompt in step.prompt:
            tensors += prompt.values.tensors()
        ages = [a.reshape(-1) for a in step.ages]
        if ages:
            tensors.append(torch.cat(ages))
        return InFlight(sequences, sampled, step.prompt, bool(ages), HostCopy(tensors))

    def collect(self, flight: InFlight) -> StepResult:
        """Wait for a launched step's read-back; its results as host lists."""
        host = iter(flight.copy.wait())
        tokens = SampledTokens([], [], [], [], None, None, [])
        if flight.sampled is not None:
            tokens = _sampled_tokens(flight.sequences, flight.sampled, host)
        prompt_logprobs = {}
        for prompt in flight.prompt:
            values = [next(host) for _ in prompt.values.tensors()]
            prompt_logprobs[prompt.request_id] = (prompt.first, prompt.values.to_lists(values))
        evicted = next(host) if flight.has_ages else torch.empty(0, dtype=torch.int64)
        return StepResult(tokens, prompt_logprobs, evicted[evicted >= 0].tolist())

    def _sample(self, pending: list[_Pending], sequences: list[Sequence]) -> SamplerOutput | None:
        if not sequences:
            return None
        blocks = [
            p.logits if len(p.logits) == len(p.sequences) else p.logits.expand(len(p.sequences), -1)
            for p in pending
        ]
        logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        rows = [self._sample_row(seq) for seq in sequences]
        # The counts of rows with penalties live on the device; the sampler adds this step's
        # tokens to them, so no step rebuilds them from the (growing) output lists.
        return self.sampler(logits, rows, self.penalty_counts)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        request = seq.request
        params = request.params
        blocked: tuple[int, ...] = ()
        if seq.num_sampled < params.min_tokens:
            blocked = (*self.eos_token_ids, *params.stop_token_ids)
        # The lists themselves, not copies: a row costs the same at any output length.
        return SampleRow(
            params,
            request.prompt_token_ids,
            seq.output_token_ids,
            seq.generator,
            blocked,
            seq.slot,
            seq.grammar,
        )

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return to_device(ids, torch.int64, self.device)


def _wants_all(chunks: list[PrefillChunk]) -> bool:
    """Whether a group (then one chunk) wants every position's logits: prompt log-probs."""
    return chunks[0].request.params.prompt_logprobs is not None


def _chunk_groups(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Chunks that can share one forward: same start, length and capacity. A chunk that
    wants prompt log-probs (every position's logits) runs alone."""
    groups: dict[tuple[int, ...], list[PrefillChunk]] = {}
    for chunk in chunks:
        request = chunk.request
        key = (chunk.position, chunk.length, request.capacity)
        if request.params.prompt_logprobs is not None:
            key = (id(chunk),)
        groups.setdefault(key, []).append(chunk)
    return list(groups.values())


def _sampler_tensors(out: SamplerOutput) -> list[torch.Tensor]:
    tensors = [out.token_ids, out.logprobs, out.ranks, out.finite]
    if out.top_token_ids is not None:
        tensors += [out.top_token_ids, out.top_logprobs]
    return tensors


def _sampled_tokens(sequences: list[Sequence], out: SamplerOutput, host) -> SampledTokens:
    token_ids, logprobs, ranks, finite = (next(host).tolist() for _ in range(4))
    top_ids = top_logprobs = None
    if out.top_token_ids is not None:
        top_ids, top_logprobs = next(host).tolist(), next(host).tolist()
    return SampledTokens(sequences, token_ids, logprobs, ranks, top_ids, top_logprobs, finite)
