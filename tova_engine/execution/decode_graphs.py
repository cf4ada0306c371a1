"""The decode step captured in CUDA graphs, one per batch-size bucket, replayed every step.

The state buffers never move, so one forward over B one-token rows (embedding, every layer
with the fused attention + eviction kernels, the counters' update, the LM head) is captured
once per bucket and replayed with new inputs. A batch is padded to its bucket with rows
that point at the state's spare slot (`KVState.pad_slot`): they compute garbage there and
never touch a live slot. Static buffers: token ids and slots in, logits and evicted ages out.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from tova_engine.attention.fused import FusedDecodeAttention
from tova_engine.model.llama import LlamaModel
from tova_engine.state.kv_state import KVState
from tova_engine.state.policies import Policy

logger = logging.getLogger("tova_engine")


class DecodeGraphs:
    def __init__(
        self, model: LlamaModel, state: KVState, policy: Policy, batch_sizes: tuple[int, ...]
    ) -> None:
        if state.pad_slot is None:
            raise ValueError("CUDA graphs need a KVState with a spare slot for padding rows")
        self.model = model
        self.state = state
        self.policy = policy
        self.batch_sizes = sorted(set(batch_sizes))
        largest = self.batch_sizes[-1]
        device = state.num_seen.device
        # Inputs: bucket b reads token ids from [0, b) and slots from [b, 2b).
        self.inputs = torch.zeros(2 * largest, dtype=torch.int64, device=device)
        self.logits = torch.zeros(largest, model.config.vocab_size, device=device)  # float32
        self.ages = torch.zeros(state.num_layers, largest, dtype=torch.int64, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        logger.info(
            "capturing %d decode CUDA graphs for batch sizes %s",
            len(self.batch_sizes),
            _ranges(self.batch_sizes),
        )
        started = time.perf_counter()
        # Largest first: the smaller graphs reuse its memory pool.
        for size in reversed(self.batch_sizes):
            self.graphs[size] = self._capture(size)
        logger.info(
            "captured %d decode CUDA graphs in %.1f s",
            len(self.graphs),
            time.perf_counter() - started,
        )

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def _bucket(self, batch: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch)]

    @torch.inference_mode()
    def _forward(self, size: int) -> None:
        slots = self.inputs[size : 2 * size]
        attend = FusedDecodeAttention(self.state, self.policy, slots, self.ages[:, :size])
        hidden = self.model(self.inputs[:size], attend.positions, attend)
        attend.finish()
        self.logits[:size].copy_(self.model.vocab_logits(hidden))  # to float32 in the copy

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        self.inputs[:size].zero_()
        self.inputs[size : 2 * size].fill_(self.state.pad_slot)
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels); it only
        # writes to the spare slot.
        return capture_on(self.state.num_seen.device, self.pool, lambda: self._forward(size))

    def run(self, token_ids: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for len(slots) <= max_batch_size rows, `token_ids` [B] on the
        device (they may not be known to the host yet); returns views of the static outputs,
        valid until the next replay: logits [B, V] float32, ages [L, B]."""
        batch = len(slots)
        size = self._bucket(batch)
        pad = size - batch
        host = torch.tensor([*[0] * pad, *slots, *[self.state.pad_slot] * pad])
        self.inputs[batch : 2 * size].copy_(host.pin_memory(), non_blocking=True)
        self.inputs[:batch].copy_(token_ids)
        self.graphs[size].replay()
        return self.logits[:batch], self.ages[:, :batch]


def _ranges(sizes: list[int]) -> str:
    """The sizes for a log line: all of them, or the ends of a long ladder (max_num_seqs
    "auto" may give 70)."""
    if len(sizes) <= 10:
        return ", ".join(map(str, sizes))
    return ", ".join([*map(str, sizes[:5]), "...", *map(str, sizes[-2:])])


def capture_on(device: torch.device, pool, forward: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """`forward` run once on a side stream of `device` (Triton compiles, cuBLAS picks its
    kernels), then captured on that stream. The stream is named: a graph of this device's
    kernels captured on another device's stream is empty.

    Not `torch.cuda.graph`: on entry it synchronises the device and empties the allocator's
    device and pinned-host caches, which mid-serving (a prefill shape met for the first time)
    stalls the step in flight and makes the next steps allocate afresh. Capture errors are
    this thread's own ("thread_local"): the core's other threads keep reading back steps."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            forward()
        finally:
            graph.capture_end()
    return graph
