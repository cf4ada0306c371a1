"""Prefill chunks replayed from CUDA graphs, one per chunk shape that recurs.

An eager prefill forward is launch-bound for short chunks: about 600 kernel launches and
15-20 ms of host time on an 8B model for a 128-token prompt whose GPU work is under 3 ms,
and the decodes in the same step wait for it. Shapes recur: prompts of one length, and every
long prompt's full chunks (start 0, 512, 1024, ... at the chunk size). A shape is
(rows, entries, length, capacity): with those fixed, a chunk group's forward (`ChunkAttention`
in every layer, the counters, the logits of each row's last position and the evicted ages)
has static shapes and no host synchronisation, so it can be captured. The group's first
position is an input like its tokens and slots: once a state is full, every full chunk of
every prompt replays one graph per row count.

Rows are padded to a power of two with rows that point at the state's spare slot (as the
decode graphs do): a group of 3 and a group of 4 replay the same graph. A shape is captured
the `min_uses`-th time it is seen, the least recently used graph goes when there are
`max_graphs`; a chunk that wants prompt log-probs (every position's logits) runs eagerly.
`capture_grid` captures the full-chunk shapes at start-up: a shape met first while serving
costs a warm-up forward and a capture inside a step that every running stream waits for.

`replay="eager"` runs the same padded forward without capturing it: the CPU path the tests
check the padding, the static buffers and the cache against.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tova_engine.execution.chunk_forward import ChunkShape, forward_chunks, shape_of, start_of
from tova_engine.execution.decode_graphs import capture_on
from tova_engine.model.llama import LlamaModel
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy
from tova_engine.step.batch import PrefillChunk

logger = logging.getLogger("tova_engine")
_MAX_SEEN = 4096  # shapes counted before the counts start over (bounded memory)


@dataclass(slots=True)
class _Captured:
    inputs: torch.Tensor  # [rows * length] token ids, then [rows] slots, then the start
    logits: torch.Tensor | None = None  # [rows, V]: each row's last position
    ages: torch.Tensor | None = None  # [layers that evicted, rows, entries + length]
    graph: torch.cuda.CUDAGraph | None = None  # None: replayed eagerly


def padded_shape(chunks: list[PrefillChunk]) -> ChunkShape:
    """The group's shape with its rows padded to a power of two."""
    return shape_of(chunks, rows=1 << (len(chunks) - 1).bit_length())


class PrefillGraphs:
    def __init__(
        self,
        model: LlamaModel,
        state: KVState,
        policy: Policy,
        max_graphs: int = 16,
        min_uses: int = 2,
        max_captured_tokens: int = 8192,
        replay: str = "cuda",
    ) -> None:
        """max_captured_tokens: the largest padded rows x length captured (a token budget that
        bounds the activation memory a captured graph keeps)."""
        if state.pad_slot is None:
            raise ValueError("prefill graphs need a KVState with a spare slot for padding rows")
        if replay not in ("cuda", "eager"):
            raise ValueError(f"replay must be 'cuda' or 'eager'; got {replay!r}")
        self.model = model
        self.state = state
        self.policy = policy
        self.max_graphs = max_graphs
        self.min_uses = min_uses
        self.max_captured_tokens = max_captured_tokens
        self.replay = replay
        self.device = state.num_seen.device
        self.pool = torch.cuda.graph_pool_handle() if replay == "cuda" else None
        self._graphs: OrderedDict[ChunkShape, _Captured] = OrderedDict()
        self._seen: dict[ChunkShape, int] = {}
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def shapes(self) -> list[ChunkShape]:
        """The captured shapes, least recently used first."""
        return list(self._graphs)

    def run(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Replay the group's forward: (logits [R, V] of each row's last position, evicted
        ages [layers, R, n + C] or None), views valid until this shape replays again. None
        when the shape is not captured (yet): the caller runs the group eagerly."""
        shape = padded_shape(chunks)
        captured = self._graphs.get(shape)
        if captured is None:
            captured = self._maybe_capture(shape)
            if captured is None:
                return None
        else:
            self._graphs.move_to_end(shape)
        self._fill_inputs(captured, shape, chunks)
        if captured.graph is not None:
            captured.graph.replay()
        else:
            captured.logits, captured.ages = self._forward(captured, shape)
        self.replays += 1
        rows = len(chunks)
        ages = None if captured.ages is None else captured.ages[:, :rows]
        return captured.logits[:rows], ages

    def _maybe_capture(self, shape: ChunkShape) -> _Captured | None:
        if shape.rows * shape.length > self.max_captured_tokens or self.max_graphs < 1:
            return None
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        seen = self._seen[shape] = self._seen.get(shape, 0) + 1
        if seen < self.min_uses:
            return None
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        captured = self._capture(shape)
        self._graphs[shape] = captured
        self._seen.pop(shape, None)
        return captured

    def capture_grid(self, chunk_size: int, token_budget: int, capacity: int) -> int:
        """Capture the shapes of full chunks on the prefill grid for rows of `capacity`: one
        to as many rows as `token_budget` holds (powers of two), before the state is full and
        once it is. Largest first (the smaller ones reuse its memory pool); at most half of
        `max_graphs`, the rest left for the shapes the traffic brings. Returns how many."""
        row_counts = []
        rows = 1
        while rows * chunk_size <= min(token_budget, self.max_captured_tokens):
            row_counts.append(rows)
            rows *= 2
        starts = range(0, capacity + chunk_size, chunk_size)
        entries = sorted({min(start, capacity) for start in starts}, reverse=True)
        shapes = [ChunkShape(r, n, chunk_size, capacity) for r in reversed(row_counts)
                  for n in entries][: self.max_graphs // 2]
        started = time.perf_counter()
        for shape in shapes:
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(shape)
        # The smallest go first when the traffic's shapes need room.
        self._graphs = OrderedDict(reversed(self._graphs.items()))
        if shapes:
            logger.info("captured %d prefill CUDA graphs in %.1f s", len(shapes),
                        time.perf_counter() - started)
        return len(shapes)

    def _fill_inputs(self, captured: _Captured, shape: ChunkShape, chunks) -> None:
        pad = shape.rows - len(chunks)
        tokens = [token for c in chunks for token in c.token_ids]
        slots = [c.request.leader.slot for c in chunks] + [self.state.pad_slot] * pad
        start = [start_of(chunks)]
        host = torch.tensor(tokens + [0] * (pad * shape.length) + slots + start,
                            dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
        captured.inputs.copy_(host, non_blocking=True)

    @torch.inference_mode()
    def _forward(self, captured: _Captured, shape: ChunkShape):
        tokens = shape.rows * shape.length
        inputs = captured.inputs
        slots, start = inputs[tokens:-1], inputs[-1:]
        return forward_chunks(
            self.model, self.state, self.policy, inputs[:tokens], slots, shape, start
        )

    def _capture(self, shape: ChunkShape) -> _Captured:
        size = shape.rows * (shape.length + 1) + 1
        inputs = torch.zeros(size, dtype=torch.int64, device=self.device)
        # Until replayed with real rows, every row points at the spare slot, from the
        # position the shape's entries imply.
        inputs[shape.rows * shape.length : -1] = self.state.pad_slot
        inputs[-1] = shape.entries
        captured = _Captured(inputs)
        if self.replay == "eager":
            self.captures += 1
            return captured
        started = time.perf_counter()
        # Warmed up first on the capture's side stream; spare slot only until replayed.

        def forward() -> None:
            captured.logits, captured.ages = self._forward(captured, shape)

        captured.graph = capture_on(self.device, self.pool, forward)
        self.captures += 1
        logger.info(
            "captured a prefill CUDA graph for %d rows x %d tokens after %d entries (%.2f s)",
            shape.rows,
            shape.length,
            shape.entries,
            time.perf_counter() - started,
        )
        return captured
