"""Several backends' rows in one model forward: a step's decode rows and its prompt-chunk
groups run their weight matmuls once, over all of the step's tokens together, and each
layer's attention is split by part (each part's tokens are a contiguous run, in order).

One forward instead of one per part: the weights are read once a step instead of once a part,
the matmuls see every token of the step at once (the shapes that run near the matmul rate),
and the layers' other kernels launch once. The parts keep their own contracts (backend.py).
"""

from __future__ import annotations

import torch

from tova_engine.attention.backend import AttentionBackend


class PackedAttention(AttentionBackend):
    def __init__(self, parts: list[AttentionBackend]) -> None:
        self.parts = parts
        part_positions = [part.positions for part in parts]
        self.sizes = [len(p) for p in part_positions]
        self._positions = torch.cat(part_positions)

    @property
    def positions(self) -> torch.Tensor:
        return self._positions  # [T], part after part

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        outputs, start = [], 0
        for part, size in zip(self.parts, self.sizes, strict=True):
            end = start + size
            outputs.append(part(layer, q[start:end], k[start:end], v[start:end]))
            start = end
        return torch.cat(outputs)

    def finish(self) -> None:
        for part in self.parts:
            part.finish()

    @property
    def evicted_ages(self) -> torch.Tensor | None:
        """The parts' ages flattened into one [N] tensor (they differ in shape); None when no
        part evicted."""
        ages = [a.reshape(-1) for part in self.parts if (a := part.evicted_ages) is not None]
        return torch.cat(ages) if ages else None
