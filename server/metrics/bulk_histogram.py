"""A histogram that takes a whole batch of observations at once.

Eviction ages arrive as one list per engine step with an entry per layer per sequence that
evicted (30 layers x 64 sequences = 1,920 values); observing them one by one through
prometheus_client would add milliseconds of lock traffic to every step on the engine
thread. Bucketing the batch with numpy costs microseconds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class BulkHistogram(Collector):
    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 labels: dict[str, str]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._labels = labels
        # One count per bucket plus +Inf, not yet cumulative.
        self._counts = np.zeros(len(self._bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_counts(self, counts: Sequence[int], total: float) -> None:
        """Observations already bucketed (per bucket, then +Inf; not cumulative)."""
        if len(counts) != len(self._counts):
            raise ValueError(f"{len(counts)} bucket counts for {len(self._counts)} buckets")
        with self._lock:
            self._counts += np.asarray(counts, dtype=np.int64)
            self._sum += total

    def observe_many(self, values: Sequence[float]) -> None:
        if not values:
            return
        array = np.asarray(values, dtype=np.float64)
        # Prometheus buckets are "less than or equal": side="left" puts v == bound in it.
        index = np.searchsorted(self._bounds, array, side="left")
        counts = np.bincount(index, minlength=len(self._counts))
        total = float(array.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=list(self._labels))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        bounds = [*(_bound(b) for b in self._bounds.tolist()), "+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), list(zip(bounds, cumulative, strict=True)),
                          sum_value=total)
        yield family


def _bound(value: float) -> str:
    # Match prometheus_client's formatting of bucket bounds ("1.0", "+Inf").
    return "+Inf" if math.isinf(value) else repr(float(value))
