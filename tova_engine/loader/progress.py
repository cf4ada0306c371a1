"""Log lines while the weights stream in: loading a large checkpoint takes tens of seconds
and must not look like a hang."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

logger = logging.getLogger("tova_engine")

# A progress line needs both: this many seconds and this share of the bytes since the last.
INTERVAL_S = 2.0
STEP_FRACTION = 0.1


class WeightsPlan(NamedTuple):
    """What a pass over the weights will read, known before reading any."""

    origin: str  # the file or folder, for the log
    num_tensors: int
    num_bytes: int  # in the dtype the tensors are yielded in


def with_progress(
    stream: Iterator[tuple[str, torch.Tensor]], plan: WeightsPlan
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `stream` unchanged, logging progress; the time includes the consumer's work
    (the copy into the model), since a tensor counts once the consumer asks for the next."""
    logger.info(
        "loading weights from %s: %d tensors, %s",
        plan.origin,
        plan.num_tensors,
        _amount(plan.num_bytes, plan.num_bytes),
    )
    started = last_time = time.perf_counter()
    count = done = last_done = 0
    for name, tensor in stream:
        yield name, tensor
        count += 1
        done += tensor.numel() * tensor.element_size()
        now = time.perf_counter()
        if now - last_time >= INTERVAL_S and done - last_done >= STEP_FRACTION * plan.num_bytes:
            logger.info(
                "loading weights from %s: %d/%d tensors, %s",
                plan.origin,
                count,
                plan.num_tensors,
                _amount(done, plan.num_bytes, of=True),
            )
            last_time, last_done = now, done
    elapsed = time.perf_counter() - started
    logger.info(
        "loaded %d tensors (%s) from %s in %.1f s",
        count,
        _amount(done, done),
        plan.origin,
        elapsed,
    )


def _amount(nbytes: int, scale: int, of: bool = False) -> str:
    """nbytes in the unit that suits `scale`: "1.2 GB", or "1.2/16.1 GB" with of=True."""
    unit, size = next((u, s) for u, s in _UNITS if scale >= s or s == 1e3)
    total = f"/{scale / size:.1f}" if of else ""
    return f"{nbytes / size:.1f}{total} {unit}"


_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
