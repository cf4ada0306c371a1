"""The engine's store of saved states (stored responses), read when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tova_engine import AsyncEngine


class SavedStatesCollector:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self._engine = engine
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.store_stats
        model = [self._model]
        snapshots = GaugeMetricFamily(
            "tova_state_store_snapshots", "Saved states held, by tier (host memory, disk).",
            labels=["model_name", "tier"])
        stored = GaugeMetricFamily(
            "tova_state_store_bytes", "Bytes of saved states held, by tier.",
            labels=["model_name", "tier"])
        for tier, count, size in (("host", stats.host_snapshots, stats.host_bytes),
                                  ("disk", stats.disk_snapshots, stats.disk_bytes)):
            snapshots.add_metric([*model, tier], count)
            stored.add_metric([*model, tier], size)
        yield snapshots
        yield stored
        for name, doc, value in (
            ("tova_state_store_hits", "Continuations that found their saved state.", stats.hits),
            ("tova_state_store_misses", "Continuations whose saved state was gone.",
             stats.misses),
            ("tova_state_store_evictions", "Saved states dropped for room (gone for good).",
             stats.evictions),
            ("tova_state_store_spills", "Saved states moved from host memory to disk.",
             stats.spills),
            ("tova_state_restores", "Saved states restored into a slot.", stats.restores),
            ("tova_state_restore_seconds", "Time spent finding and checking restored states.",
             stats.restore_seconds),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            yield family
