"""What the repetition, frequency and presence penalties read: per sequence, how often it has
generated each token and which tokens its prompt holds.

`PenaltyCounts` keeps them per state slot on the device and adds each step's sampled tokens
in place, so a decode step never rebuilds them from the host-side token lists: its cost does
not grow with the tokens a sequence has generated. `counts_from_lists` builds the same rows
from token lists, for calling the sampler without slots (and as the tests' reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from tova_engine.transfer import to_device


class TokenCounts(NamedTuple):
    """The penalty inputs of P sampler rows."""

    output: torch.Tensor  # [P, V] float32: occurrences of each token in the output
    in_prompt: torch.Tensor  # [P, V] bool: token in the prompt (read by the repetition penalty)

    def seen(self) -> torch.Tensor:
        """[P, V] bool: in the prompt or the output (vLLM's repetition-penalty set)."""
        return self.in_prompt | (self.output > 0)


class PenaltyCounts:
    """Owner of the per-slot penalty counts; rows are state slots (`KVState` rows).

    Only the slots of requests with penalties are kept up to date (reset on admission, copied
    on an n > 1 fork, added to after each sampling); the other rows hold stale values that
    nobody reads, and a batch without penalties never touches the buffers.
    """

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.device = device
        # Allocated by the first request with penalties: [slots, V] is large (256 slots x
        # 128K vocab: 128 MiB of float32 counts + 32 MiB of bool) and most servers never use it.
        self._output: torch.Tensor | None = None
        self._in_prompt: torch.Tensor | None = None

    @property
    def allocated(self) -> bool:
        return self._output is not None

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._output is None or self._in_prompt is None:
            shape = (self.num_slots, self.vocab_size)
            # float32: exact up to 2**24 occurrences, and the penalty formulas read it as is.
            self._output = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self._in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._output, self._in_prompt

    def reset(self, slot: int, prompt_token_ids: Sequence[int] | None) -> None:
        """Empty a slot for a new request; `prompt_token_ids` only when its repetition penalty
        reads them (ids in [0, V), as the request builder checks)."""
        output, in_prompt = self._buffers()
        output[slot] = 0
        in_prompt[slot] = False
        if prompt_token_ids:
            ids = to_device(list(prompt_token_ids), torch.int64, self.device)
            in_prompt[slot].index_fill_(0, ids, True)

    def copy(self, src: int, dst: int) -> None:
        """Fork: the n > 1 choices of a request start from its leader's counts."""
        output, in_prompt = self._buffers()
        output[dst] = output[src]
        in_prompt[dst] = in_prompt[src]

    def add(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one sampled token per slot: slots, token_ids [P] int64 on the device. No host
        sync: the tokens are read while still on the device."""
        output, _ = self._buffers()
        ones = torch.ones(token_ids.shape, dtype=output.dtype, device=output.device)
        output.view(-1).scatter_add_(0, slots * self.vocab_size + token_ids, ones)

    def gather(self, slots: torch.Tensor) -> TokenCounts:
        """The rows of `slots` ([P] int64 on the device)."""
        output, in_prompt = self._buffers()
        return TokenCounts(output.index_select(0, slots), in_prompt.index_select(0, slots))


def _occurrences(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[P, V] float32 occurrence counts; padding goes to an extra column that is dropped."""
    width = max(1, max(len(ids) for ids in id_lists))
    padded = [ids + [vocab] * (width - len(ids)) for ids in id_lists]
    index = to_device(padded, torch.int64, device)
    counts = torch.zeros(len(id_lists), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def counts_from_lists(
    prompts: list[Sequence[int]], outputs: list[Sequence[int]], vocab: int, device: torch.device
) -> TokenCounts:
    """The same rows rebuilt from token lists: O(tokens) host work and a copy per call."""
    output = _occurrences([list(ids) for ids in outputs], vocab, device)
    in_prompt = _occurrences([list(ids) for ids in prompts], vocab, device) > 0
    return TokenCounts(output, in_prompt)
