"""Batched sampling with vLLM semantics, free of host syncs.

Order, as vLLM: logits processors -> blocked ids -> repetition penalty -> frequency/presence
penalties -> (greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p -> sample.
Sampling is an exponential race, argmax(probs / q) with q ~ Exp(1): it draws exactly from
`probs`, needs no host sync, and lets a seeded row draw its noise from its own generator.
The penalties read per-slot counts kept on the device (`PenaltyCounts`, given by a caller that
samples step after step) or, without them, counts rebuilt from the rows' token lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from tova_engine.execution.logprobs import chosen_logprobs
from tova_engine.execution.penalty_counts import PenaltyCounts, TokenCounts, counts_from_lists
from tova_engine.sampling_params import SamplingParams
from tova_engine.structured.bitmask import mask_rows
from tova_engine.transfer import to_device

_MASK64 = (1 << 64) - 1


class SampleRow(NamedTuple):
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The request's own generator when it has a seed, else None (the sampler's is used).
    generator: torch.Generator | None
    # Ids that must not be sampled now (eos/stop ids while min_tokens is not reached).
    block_token_ids: tuple[int, ...] = ()
    # The sequence's state slot: with `PenaltyCounts` given to the sampler, a row with
    # penalties reads its counts there instead of rebuilding them from the token lists.
    slot: int | None = None
    # Structured outputs: the sequence's matcher; the row samples only what it allows.
    grammar: Any = None


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    # [B] float32 (float64 for float64 logits): log-prob of the sampled token under the raw
    # model distribution, before penalties and temperature (vLLM's default).
    logprobs: torch.Tensor
    ranks: torch.Tensor  # [B] int64, 1 = most likely under the raw distribution
    top_token_ids: torch.Tensor | None  # [B, K], K = max requested logprobs; None if none asked
    top_logprobs: torch.Tensor | None  # [B, K], dtype of `logprobs`
    # [B] bool: False where the row's logits had a NaN/+inf or nothing samplable; its token is
    # arbitrary and the caller fails that request alone.
    finite: torch.Tensor


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of choice `index` of a seeded request.

    Mixing (seed, index) through splitmix64 keeps choices of one request apart and avoids the
    collisions of `seed + index` (seed 1 choice 1 == seed 2 choice 0).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ index))
    return generator


def _apply_logits_processors(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    for i, row in enumerate(rows):
        if not row.params.logits_processors:
            continue
        # The sequence's own list, not a copy (O(1) per step): processors must not mutate it.
        logits = x[i]
        for processor in row.params.logits_processors:
            logits = processor(row.output_token_ids, logits)
        x[i] = logits


def _apply_block(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    vocab = x.shape[1]
    # Ids past the vocabulary (a user's stop_token_ids) would be a device-side assert on CUDA.
    flat = [
        i * vocab + t for i, row in enumerate(rows) for t in row.block_token_ids if 0 <= t < vocab
    ]
    if flat:
        # index_fill_ takes the value as a scalar; `x[i, j] = v` copies v to the device (a sync).
        x.view(-1).index_fill_(0, to_device(flat, torch.int64, x.device), float("-inf"))


def uses_penalties(params: SamplingParams) -> bool:
    """True when a request's rows read token counts (repetition, frequency or presence)."""
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0
        or params.presence_penalty != 0
    )


def _apply_repetition_penalty(
    x: torch.Tensor, rows: Sequence[SampleRow], counts: TokenCounts
) -> None:
    if all(row.params.repetition_penalty == 1.0 for row in rows):
        return
    penalty = to_device([row.params.repetition_penalty for row in rows], torch.float32, x.device)[
        :, None
    ]
    # Rows with penalty 1 are unchanged exactly: x / 1 and x * 1 are exact in IEEE arithmetic.
    penalized = torch.where(x > 0, x / penalty, x * penalty)
    x.copy_(torch.where(counts.seen(), penalized, x))


def _apply_frequency_presence(
    x: torch.Tensor, rows: Sequence[SampleRow], counts: TokenCounts
) -> None:
    if all(r.params.frequency_penalty == 0 and r.params.presence_penalty == 0 for r in rows):
        return
    penalties = to_device(
        [(r.params.frequency_penalty, r.params.presence_penalty) for r in rows],
        torch.float32,
        x.device,
    )
    output = counts.output
    x.sub_(penalties[:, :1] * output + penalties[:, 1:] * (output > 0))


class _Penalized(NamedTuple):
    """The rows of a batch with token penalties, and where their counts come from."""

    rows: list[int]  # batch rows, ascending
    index: torch.Tensor | None  # [P] int64, the same rows on the device; None when all rows
    counts: PenaltyCounts | None  # None: rebuild the counts from the rows' token lists
    slots: torch.Tensor | None  # [P] int64, the rows' slots in `counts`


def _penalized(
    rows: Sequence[SampleRow], counts: PenaltyCounts | None, device: torch.device
) -> _Penalized | None:
    picked = [i for i, row in enumerate(rows) if uses_penalties(row.params)]
    if not picked:
        return None
    index = None if len(picked) == len(rows) else to_device(picked, torch.int64, device)
    slots = None
    if counts is not None:
        slots = to_device([rows[i].slot for i in picked], torch.int64, device)
    return _Penalized(picked, index, counts, slots)


def _token_counts(x: torch.Tensor, rows: list[SampleRow], penalized: _Penalized) -> TokenCounts:
    if penalized.counts is None:
        prompts = [row.prompt_token_ids for row in rows]
        outputs = [row.output_token_ids for row in rows]
        return counts_from_lists(prompts, outputs, x.shape[1], x.device)
    return penalized.counts.gather(penalized.slots)


def _apply_token_penalties(
    x: torch.Tensor, rows: Sequence[SampleRow], penalized: _Penalized | None
) -> None:
    """Repetition, then frequency/presence penalties, on the rows that use them only."""
    if penalized is None:
        return
    chosen = [rows[i] for i in penalized.rows]
    counts = _token_counts(x, chosen, penalized)
    y = x if penalized.index is None else x.index_select(0, penalized.index)  # [P, V]
    _apply_repetition_penalty(y, chosen, counts)
    _apply_frequency_presence(y, chosen, counts)
    if penalized.index is not None:
        x.index_copy_(0, penalized.index, y)


def _penalize(
    logits: torch.Tensor, rows: Sequence[SampleRow], penalized: _Penalized | None
) -> torch.Tensor:
    # Row-major: blocked ids index the flattened tensor.
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _apply_logits_processors(x, rows)
    _apply_block(x, rows)
    _apply_token_penalties(x, rows, penalized)
    constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
    if constrained:
        mask_rows(x, constrained, [rows[i].grammar for i in constrained])
    return x


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[SampleRow], counts: PenaltyCounts | None = None
) -> torch.Tensor:
    """Processors, blocked ids and penalties; returns a float32 copy of `logits` [B, V].

    counts: rows with penalties read their slot's counts there, else their token lists.
    """
    return _penalize(logits, rows, _penalized(rows, counts, logits.device))


def _apply_temperature(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    # Greedy rows divide by 1: their argmax is taken before, and 0 would make NaNs.
    temps = [1.0 if r.params.greedy else r.params.temperature for r in rows]
    if any(t != 1.0 for t in temps):
        x.div_(to_device(temps, torch.float32, x.device)[:, None])


def _apply_top_k_top_p(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    vocab = x.shape[1]
    top_k = [min(r.params.top_k, vocab) or vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return
    params = to_device(list(zip(top_k, top_p, strict=True)), torch.float32, x.device)
    sorted_x, order = x.sort(dim=-1, descending=True)
    position = torch.arange(vocab, device=x.device, dtype=torch.float32)
    # Top-k by position in sorted order: exactly k survive even when logits tie.
    sorted_x.masked_fill_(position >= params[:, :1], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # The smallest prefix with mass >= p: a token stays while the mass before it is < p.
    # The most likely one always stays, also when p rounds to 0 in float32 (top_p=1e-46).
    # p == 1 keeps all (cumsum rounding could drop some).
    p = params[:, 1:]
    drop = (mass_before >= p) & (p < 1.0) & (position > 0)
    sorted_x.masked_fill_(drop, float("-inf"))
    x.scatter_(1, order, sorted_x)


def _apply_min_p(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    if all(r.params.min_p == 0 for r in rows):
        return
    min_p = to_device([r.params.min_p for r in rows], torch.float32, x.device)[:, None]
    # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); min_p = 0 gives -inf, keeps all.
    threshold = x.amax(dim=-1, keepdim=True) + min_p.log()
    x.masked_fill_(x < threshold, float("-inf"))


def apply_filters(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """In place: temperature, top-k/top-p and min-p, each row with its own (filtered-out
    tokens -inf). Greedy rows take their argmax before the filters, which keep that token."""
    _apply_temperature(x, rows)
    _apply_top_k_top_p(x, rows)
    _apply_min_p(x, rows)


def _row_ok(x: torch.Tensor) -> torch.Tensor:
    """[B] bool: no NaN or +inf, and at least one token with non-zero probability."""
    # One reduction: the row maximum is NaN if any entry is (amax propagates NaN), +inf if
    # one is +inf, and -inf if every entry is.
    return torch.isfinite(x.amax(dim=-1))


class Sampler:
    """Samples one token per row of a [B, V] logits batch; see `SampleRow` for per-row inputs."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        # Unseeded rows draw from this generator, in one batched call.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SampleRow],
        counts: PenaltyCounts | None = None,
    ) -> SamplerOutput:
        """counts: the per-slot penalty counts of a caller that samples step after step. Rows
        with penalties then read theirs by `SampleRow.slot`, and the tokens sampled for them
        are added on the device: one call is one step. Without it, rows read their lists."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        # At least float32 (bf16 log-probs are too coarse); float64 logits keep their precision.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=dtype)
        penalized = _penalized(rows, counts, logits.device)
        x = _penalize(logits, rows, penalized)
        finite = _row_ok(logits) & _row_ok(x)
        # A broken row samples uniformly instead of spreading NaNs; the caller fails it.
        x = torch.where(finite[:, None], x, 0.0)
        token_ids = self._sample(x, rows)
        if penalized is not None and penalized.counts is not None:
            _count(penalized, token_ids)
        return _with_logprobs(raw_logprobs, token_ids, finite, rows)

    def _sample(self, x: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        greedy = [row.params.greedy for row in rows]
        # Before the filters, so top_k=1 picks the same token as temperature 0, ties included.
        argmax = x.argmax(dim=-1)
        if all(greedy):
            return argmax
        apply_filters(x, rows)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.generator is not None and not greedy[i]:
                # Drawn from the request's generator only: independent of the batch around it.
                noise[i].exponential_(generator=row.generator)
        # exponential_ may return exactly 0; 0/0 would be a NaN that argmax picks.
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        sampled = probs.div_(noise).argmax(dim=-1)
        return torch.where(to_device(greedy, torch.bool, x.device), argmax, sampled)


def _count(penalized: _Penalized, token_ids: torch.Tensor) -> None:
    """Add the tokens sampled for the penalized rows to their slots' counts."""
    if penalized.index is not None:
        token_ids = token_ids.index_select(0, penalized.index)
    penalized.counts.add(penalized.slots, token_ids)


def _with_logprobs(
    raw_logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    finite: torch.Tensor,
    rows: Sequence[SampleRow],
) -> SamplerOutput:
    logprobs, ranks = chosen_logprobs(raw_logprobs, token_ids)
    k = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
    top_logprobs = top_ids = None
    if k is not None:
        top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)
    return SamplerOutput(token_ids, logprobs, ranks, top_ids, top_logprobs, finite)
