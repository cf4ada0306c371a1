"""The tensor-parallel group as the model sees it: rank, size and the few collectives it uses
(torch.distributed: gloo on CPU, NCCL on CUDA), and joining and leaving it. Size 1 makes every
collective a no-op."""

from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """This rank's [start, end) of `total` items split evenly (`what` names them)."""
        if total % self.size:
            raise ValueError(
                f"tensor_parallel_size ({self.size}) must divide the model's {what} ({total})"
            )
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.enabled:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (rank order)."""
        return x if not self.enabled else torch.cat(self.all_gather(x), dim=-1)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x`, rank order."""
        if not self.enabled:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return parts

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        if self.enabled:
            dist.broadcast(x, src=0)
        return x


SINGLE = TensorParallel()


def check_free() -> None:
    """Raises ValueError if this process is still in another engine's group: torch.distributed
    holds one per process."""
    if dist.is_initialized():
        gc.collect()  # an engine dropped in a reference cycle leaves its group when collected
    if dist.is_initialized():
        raise ValueError(
            "tensor_parallel_size: this process is still in another tensor-parallel engine's "
            "group; close() that engine (or leave its `with` block) before building another"
        )


def join_group(
    device: torch.device, rank: int, size: int, init_method: str, timeout_s: float
) -> TensorParallel:
    """Join this process to the group as `rank`; on CUDA rank r runs on cuda:r. timeout_s
    bounds forming the group and every collective after it: a collective that waits longer
    means a rank is gone, and failing beats hanging."""
    check_free()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TensorParallel(rank, size)


def leave_group() -> None:
    """Tear this process's group down. NCCL: abort, which waits for no peer (destroying
    waits for every rank's part of the communicator); gloo: destroy."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()

