"""Continuous batching over fixed slots: FIFO admission, all decodes every step, prefill
chunks in the token budget that is left. The scheduler never creates a tensor.

Prompt chunks stay whole and on a grid from token 0 (`prefill_chunk_size`): a chunk that
does not fit what is left of a step's budget waits for the next step instead of being cut,
so a prompt's state at a chunk boundary depends on its tokens alone, whatever ran beside it
(what the prefix cache relies on, and what makes outputs independent of the load). Only a
step that would otherwise prefill nothing cuts one, and that prompt is cached no more."""

from __future__ import annotations

from collections import deque

from tova_engine.core.prefill_pacer import PrefillPacer
from tova_engine.core.prefix_cache import PrefixCache
from tova_engine.step.batch import PrefillChunk, SchedulerOutput
from tova_engine.step.request import Request, Sequence


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        token_budget: int,
        prefill_chunk_size: int,
        prefix_cache: PrefixCache | None = None,
        pacer: PrefillPacer | None = None,
    ) -> None:
        self.token_budget = token_budget
        # Prompt tokens beside running decodes, paced to a step time (none: the budget alone).
        self.pacer = pacer
        self.prefix_cache = prefix_cache if prefix_cache and prefix_cache.enabled else None
        self.prefill_chunk_size = prefill_chunk_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Lowest slot first, so small batches stay at the front of the buffers.
        self.free_slots: list[int] = list(range(max_num_seqs - 1, -1, -1))
        self.num_slots = max_num_seqs
        self._removed: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self.free_slots)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        if self.prefix_cache is not None:
            self.prefix_cache.new_step()
        admitted = self._admit()
        # A choice that has sampled its last allowed token (in a step still in flight, maybe)
        # has nothing left to run.
        decodes = [
            seq
            for request in self.running
            if not request.prefilling
            for seq in request.live_sequences()
            if seq.num_sampled < request.max_tokens
        ]
        budget = self.token_budget - len(decodes)
        if self.pacer is not None:
            budget = min(budget, self.pacer.prompt_budget(len(decodes)))
        prefills = self._prefill_chunks(budget)
        scheduled = SchedulerOutput(admitted, decodes, prefills, self._removed)
        if not scheduled.empty:  # an empty step never runs: the next one reports them
            self._removed = []
        return scheduled

    def _admit(self) -> list[Request]:
        admitted = []
        # FIFO: a request needing more slots than are free holds back those behind it.
        while self.waiting and len(self.waiting[0].sequences) <= len(self.free_slots):
            request = self.waiting.popleft()
            for seq in request.sequences:
                seq.slot = self.free_slots.pop()
            self.running.append(request)
            admitted.append(request)
        return admitted

    def _prefill_chunks(self, budget: int) -> list[PrefillChunk]:
        chunks: list[PrefillChunk] = []
        for request in self.running:
            if budget <= 0:
                break
            if not request.prefilling:
                continue
            length = min(self.prefill_chunk_size, request.prompt_len - request.num_computed)
            if length > budget and chunks:
                continue  # whole chunks only: it runs in a step with room for it
            restore_from = self._restore_row(request)  # may shorten what is left
            length = min(self.prefill_chunk_size, request.prompt_len - request.num_computed)
            if length > budget:
                length, request.on_grid = budget, False
            start = request.num_computed
            # Counted as computed once scheduled: the next step, scheduled while this one
            # may still run, continues after it.
            request.num_computed += length
            budget -= length
            chunks.append(
                PrefillChunk(request, start, length, self._save_row(request), restore_from)
            )
        return chunks

    def _restore_row(self, request: Request) -> int | None:
        """At a prompt's first chunk: the cached prefix it starts from, if any (its tokens
        then count as computed)."""
        if self.prefix_cache is None or request.prefix_looked_up:
            return None
        request.prefix_looked_up = True
        hit = self.prefix_cache.lookup(request)
        if hit is None:
            return None
        request.num_computed = request.cached_tokens = hit.tokens
        return hit.row

    def _save_row(self, request: Request) -> int | None:
        if self.prefix_cache is None or not request.on_grid:
            return None
        return self.prefix_cache.save_row(request, request.num_computed)

    def release_sequence(self, seq: Sequence) -> None:
        """Give a finished choice's slot back at once; the request leaves when all are done."""
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def remove(self, request: Request) -> None:
        for seq in request.sequences:
            self.release_sequence(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return  # removed already
        if self.prefix_cache is not None:
            self.prefix_cache.release(request.request_id)
        self._removed.append(request.request_id)
