"""One forward of a group of prompt chunks at the same point of their prompts: the eager
step (`runner.py`) and the captured one (`prefill_graphs.py`) run exactly this.

A group's shape fixes its kernels and tensor shapes; its first position is an input (an int,
or a device tensor a captured graph reads): every full chunk past the state's capacity has
the same shape wherever it starts, so one graph serves them all."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tova_engine.attention.pytorch import ChunkAttention
from tova_engine.model.llama import LlamaModel
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy
from tova_engine.step.batch import PrefillChunk


class ChunkShape(NamedTuple):
    """What fixes a chunk group's forward: with these equal, two groups run the same kernels
    on tensors of the same shapes."""

    rows: int
    entries: int  # valid entries every row holds before the chunk
    length: int
    capacity: int  # the rows' state size


def shape_of(chunks: list[PrefillChunk], rows: int | None = None) -> ChunkShape:
    """A group's shape (chunks at the same point of their prompts, of one capacity), with
    `rows` rows (default: one per chunk; the captured graphs pad them)."""
    first = chunks[0]
    capacity = first.request.capacity
    return ChunkShape(rows or len(chunks), min(first.position, capacity), first.length, capacity)


def start_of(chunks: list[PrefillChunk]) -> int:
    """The group's first position (the same in every row)."""
    return chunks[0].position


def chunk_attention(
    state: KVState,
    policy: Policy,
    slots: list[int] | torch.Tensor,
    shape: ChunkShape,
    start: int | torch.Tensor,
) -> ChunkAttention:
    """The attention of a chunk group of this shape on these slots, from position `start`."""
    return ChunkAttention(state, policy, slots, shape.entries, start, shape.length, shape.capacity)


def forward_chunks(
    model: LlamaModel,
    state: KVState,
    policy: Policy,
    token_ids: torch.Tensor,
    slots: list[int] | torch.Tensor,
    shape: ChunkShape,
    start: int | torch.Tensor,
    every_position: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_ids [rows * length], row after row; slots [rows]; start: the first position, an
    int or a [1] device tensor. Returns the logits, [rows, V]
    at each row's last position or [rows * length, V] at every position, and the evicted
    ages (`ChunkAttention.evicted_ages`, None when no layer evicted)."""
    attend = chunk_attention(state, policy, slots, shape, start)
    hidden = model(token_ids, attend.positions, attend)  # [rows * length, hidden]
    attend.finish()
    if not every_position:  # logits only where they are used
        hidden = hidden.view(shape.rows, shape.length, -1)[:, -1]
    return model.compute_logits(hidden), attend.evicted_ages
