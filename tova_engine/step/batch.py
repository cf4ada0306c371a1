"""The work of one step, as the scheduler chose it and the executor runs it."""

from __future__ import annotations

from typing import NamedTuple

from tova_engine.step.request import Request, Sequence


class PrefillChunk(NamedTuple):
    request: Request
    start: int
    length: int
    # The cache row the prompt's state is copied to once this chunk has run (a block
    # boundary of core/prefix_cache.py), or None.
    save_to: int | None = None
    # The cache row of a cached prefix restored into the slot before this, the prompt's
    # first chunk, runs from where that prefix ends; or None.
    restore_from: int | None = None

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.request.prompt_len

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_token_ids[self.start : self.start + self.length]

    @property
    def position(self) -> int:
        """The chunk's first token's position in the sequence (a continued conversation's
        prompt starts where its saved state stopped)."""
        return self.request.position_offset + self.start


class SchedulerOutput(NamedTuple):
    # Requests that took slots this step: their slots must be reset before running.
    admitted: list[Request]
    decodes: list[Sequence]
    prefills: list[PrefillChunk]
    # Requests removed (finished or aborted) since the last step that ran: under tensor
    # parallelism the other ranks drop their copies of them.
    removed: list[str]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def requests(self) -> list[Request]:
        """Every request with work in the step (failed together if the step raises)."""
        seen: dict[int, Request] = {}
        for seq in self.decodes:
            seen[id(seq.request)] = seq.request
        for chunk in self.prefills:
            seen[id(chunk.request)] = chunk.request
        return list(seen.values())
