"""Histogram buckets; the latency ones are vLLM's, so dashboards compare like with like."""

from __future__ import annotations

# The token-count buckets; the engine bins eviction ages with the same ones.
from tova_engine.core.eviction_ages import one_two_five  # noqa: F401

TIME_TO_FIRST_TOKEN = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
REQUEST_LATENCY = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# Engine steps run from well under a millisecond (small batches on a GPU) to seconds (CPU).
STEP_DURATION = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
HTTP_LATENCY = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)


def powers_of_two(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including `limit` (batch sizes)."""
    buckets, value = [], 1
    while value < limit:
        buckets.append(value)
        value *= 2
    return (*buckets, limit)
