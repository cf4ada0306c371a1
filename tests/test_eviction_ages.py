"""Eviction ages binned in the core before they are sent: the histogram a front end builds
from the counts equals the one built from every age."""

from __future__ import annotations

import random

import msgspec
import pytest

from server.metrics.bulk_histogram import BulkHistogram
from tova_engine.core.eviction_ages import bin_ages, compact, one_two_five
from tova_engine.core.messages import StepStats, Wire


def histogram(bounds) -> BulkHistogram:
    return BulkHistogram("ages", "test", bounds, {"model_name": "m"})


def samples(h: BulkHistogram) -> dict:
    (family,) = h.collect()
    return {(s.name, s.labels.get("le")): s.value for s in family.samples}


def test_binned_counts_make_the_same_histogram_as_every_age():
    bounds = one_two_five(4096)
    rng = random.Random(0)
    ages = [rng.choice([0, 1, 2, 3, 5, 6, 4096, 4097, 9000]) for _ in range(500)]
    ages += [rng.randrange(0, 6000) for _ in range(5000)]
    from_ages, from_counts = histogram(bounds), histogram(bounds)
    from_ages.observe_many(ages)
    counts, total = bin_ages(ages, bounds)
    assert sum(counts) == len(ages) and total == sum(ages)
    from_counts.observe_counts(counts, total)
    assert samples(from_counts) == samples(from_ages)
    with pytest.raises(ValueError, match="bucket counts"):
        from_counts.observe_counts(counts[:-1], total)


def test_stats_cross_the_wire_with_counts_instead_of_ages():
    stats = StepStats("decode", 0.01, 3, 0, 3, [7, 7, 300, 5000], 3, 0, 3)
    bounds = one_two_five(4096)
    compact(stats, bounds)
    assert stats.evicted_ages == [] and stats.evicted_count == 4
    assert stats.evicted_age_sum == 7 + 7 + 300 + 5000
    decoded = msgspec.msgpack.decode(Wire().encoder.encode(stats), type=StepStats)
    assert decoded.evicted_age_counts == stats.evicted_age_counts
    assert decoded.evicted_count == 4
    assert one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)
