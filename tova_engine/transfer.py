"""Host <-> device transfers without stalls: inputs go through pinned memory asynchronously,
and everything a step reads back travels in one copy (the step's only synchronisation)."""

from __future__ import annotations

import torch


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor; on CUDA through pinned memory, without waiting."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def _as_int64_bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    if t.dtype.is_floating_point:
        # Through float64, whose bits an int64 carries exactly (float32 round-trips too).
        return flat.to(torch.float64).view(torch.int64)
    return flat.to(torch.int64)


def _restore(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dtype.is_floating_point:
        return bits.view(torch.float64).to(like.dtype).reshape(like.shape)
    return bits.to(like.dtype).reshape(like.shape)


class HostCopy:
    """CPU copies of `tensors` (same dtypes and shapes) through a single device-to-host copy,
    started now and finished by `wait()`: on CUDA the copy into pinned memory is queued
    behind the work that produces `tensors`, so the host can queue more work (the next step)
    before it waits."""

    __slots__ = ("_event", "_packed", "_tensors")

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._tensors = tensors
        self._packed = self._event = None
        if tensors and any(t.device.type != "cpu" for t in tensors):
            packed = torch.cat([_as_int64_bits(t) for t in tensors])
            self._packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._packed.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> list[torch.Tensor]:
        if self._packed is None:
            return self._tensors
        self._event.synchronize()
        out, start = [], 0
        for t in self._tensors:
            out.append(_restore(self._packed[start : start + t.numel()], t))
            start += t.numel()
        return out
