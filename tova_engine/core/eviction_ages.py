"""Eviction ages summarised as a histogram before a step leaves the core process.

A step reports how many tokens back each evicted entry was, one value per layer per sequence
that evicted: 32 layers x 1,024 sequences is 32,768 integers a step. In-process callers get
them as they are (tests check them one by one); across the process boundary they travel as
the counts of 1-2-5 buckets, so neither the core's sending thread nor any front end encodes,
decodes or sorts tens of thousands of integers a step, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tova_engine.core.messages import StepStats


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including `limit` (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value >= limit:
                return (*buckets, limit)
            buckets.append(value)
        scale *= 10


def bin_ages(ages: Sequence[int], bounds: Sequence[float]) -> tuple[list[int], float]:
    """Per bucket (`value <= bound`, then +Inf) how many ages fall in it, not cumulative; and
    their sum."""
    array = np.asarray(ages, dtype=np.float64)
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), array, side="left")
    counts = np.bincount(index, minlength=len(bounds) + 1)
    return counts.tolist(), float(array.sum())


def compact(stats: StepStats, bounds: Sequence[float]) -> None:
    """Replace the stats' ages with their bucket counts (before the stats are sent)."""
    if stats.evicted_ages:
        stats.evicted_age_counts, stats.evicted_age_sum = bin_ages(stats.evicted_ages, bounds)
        stats.evicted_ages = []
