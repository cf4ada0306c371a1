"""Continuous batching over fixed slots: FIFO admission, all decodes every step, prefill
chunks in the token budget that is left. The scheduler never creates a tensor."""

from __future__ import annotations

from collections import deque

from tova_engine.step.batch import PrefillChunk, SchedulerOutput
from tova_engine.step.request import Request, Sequence


class Scheduler:
    def __init__(self, max_num_seqs: int, token_budget: int, prefill_chunk_size: int) -> None:
        self.token_budget = token_budget
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
        prefills = self._prefill_chunks(self.token_budget - len(decodes))
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
        chunks = []
        for request in self.running:
            if budget <= 0:
                break
            if request.prefilling:
                length = min(
                    self.prefill_chunk_size, request.prompt_len - request.num_computed, budget
                )
                chunks.append(PrefillChunk(request, request.num_computed, length))
                # Counted as computed once scheduled: the next step, scheduled while this one
                # may still run, continues after it.
                request.num_computed += length
                budget -= length
        return chunks

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
        self._removed.append(request.request_id)
