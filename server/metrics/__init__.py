"""Prometheus metrics: names, types and where each is observed.

Three sources feed them: the engine's per-step `StepStats` (on the engine thread: token
counters, step times, batch sizes, evictions, prefix-cache lookups), the server's view of
each request as its outputs arrive (latencies, per-request token counts, how it finished)
and, at scrape time, the engine's counters (running, waiting, slots, prefix-cache rows).
Every series carries `model_name`.

With several front-end processes (`--api-server-count`), prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set by the supervisor) makes the counters, histograms and
the waiting gauge one view whichever process answers the scrape: each process writes its
own, and a scrape sums them. Every front end receives every step's stats, so the engine's
counters are observed by the first front end only (`observes_engine`), while what is
computed at scrape time (live gauges, eviction ages, the state store) is whole in each.
The per-process collectors (CPU, memory, GC) are left out then: they would describe only
the process that answered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from server.metrics import buckets
from server.metrics.bulk_histogram import BulkHistogram
from tova_engine import StepStats

logger = logging.getLogger("server")
FINISH_REASONS = ("stop", "length", "abort", "error")


def multiprocess_dir() -> str | None:
    """Where the front-end processes keep their metrics files (None: one process)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self, model_name: str, max_model_len: int, max_num_seqs: int,
                 observes_engine: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.observes_engine = observes_engine
        self._step_error_logged = False
        self._model = {"model_name": model_name}
        self._shared_dir = multiprocess_dir()
        # Collectors computed in this process at scrape time (rendered in both modes).
        self._local: list = []
        self._waiting: Callable[[], float] = lambda: 0.0
        if self._shared_dir is None:
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
        self._define_gauges()
        self._define_counters()
        self._define_request_histograms(max_model_len)
        self._define_step_histograms(max_num_seqs, max_model_len)
        self._define_http()

    # ----- definitions --------------------------------------------------------------------

    def _gauge(self, name: str, doc: str) -> Gauge:
        """A gauge every front end sets to the same value (the engine's constants)."""
        return Gauge(name, doc, ["model_name"], registry=self.registry, multiprocess_mode="max")

    def _define_gauges(self) -> None:
        # Each front end's own waiting requests: the scrape sums the live processes'.
        self.requests_waiting = Gauge(
            "tova_requests_waiting", "Requests submitted and waiting for a slot.",
            ["model_name"], registry=self.registry, multiprocess_mode="livesum")
        self.slots_total = self._gauge(
            "tova_state_slots_capacity", "State slots allocated at start-up (max_num_seqs).")
        self.memory_bytes = self._gauge(
            "tova_state_memory_bytes", "Bytes of the state buffers, allocated once at start-up.")
        self.sequence_bytes = Gauge(
            "tova_state_sequence_bytes",
            "K/V bytes of one sequence's state by layer kind: global layers hold state_size "
            "entries, local (sliding-window) layers at most their window.",
            ["model_name", "layer_kind"], registry=self.registry)
        self.sequence_saved_bytes = self._gauge(
            "tova_state_sequence_saved_bytes",
            "K/V bytes per sequence that local layers' windows save against every layer "
            "holding state_size entries.")
        self.prefix_cache_rows = self._gauge(
            "tova_prefix_cache_rows_capacity",
            "State rows set aside for cached prompt prefixes (--prefix-cache-bytes; 0: off).")
        self.prefix_cache_bytes = self._gauge(
            "tova_prefix_cache_memory_bytes",
            "Bytes of the prefix cache's rows, allocated once at start-up beside the slots'.")
        self.engine_info = Gauge(
            "tova_engine_info", "Constant 1; the labels describe the engine's configuration.",
            ["model_name", "policy", "state_size", "max_num_seqs", "dtype", "device",
             "quantization", "kv_cache_dtype"],
            registry=self.registry, multiprocess_mode="max")

    def _define_counters(self) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["model_name", *labels], registry=self.registry)

        self.prompt_tokens = counter(
            "tova_prompt_tokens", "Prompt tokens run through the model (prefill)."
        ).labels(self.model_name)
        self.generation_tokens = counter(
            "tova_generation_tokens", "Tokens sampled (every choice counts)."
        ).labels(self.model_name)
        self.requests = counter(
            "tova_requests",
            "Finished choices by finish reason (a request with n choices counts n).",
            ("finished_reason",))
        self.evicted_tokens = counter(
            "tova_evicted_tokens", "State entries evicted (one per layer per token dropped)."
        ).labels(self.model_name)
        self.prefix_cache_queries = counter(
            "tova_prefix_cache_queries",
            "Prompt tokens of the prompts looked up in the prefix cache (at their first chunk).",
        ).labels(self.model_name)
        self.prefix_cache_hits = counter(
            "tova_prefix_cache_hits",
            "Prompt tokens whose state the prefix cache restored instead of prefilling them.",
        ).labels(self.model_name)
        self.engine_restarts = counter(
            "tova_engine_restarts",
            "Times the engine core process died and was started again.",
        ).labels(self.model_name)
        for reason in FINISH_REASONS:  # so every series exists from the start
            self.requests.labels(self.model_name, reason)

    def _histogram(self, name: str, doc: str, bucket_list, labels: tuple[str, ...] = ()):
        return Histogram(name, doc, ["model_name", *labels], buckets=bucket_list,
                         registry=self.registry)

    def _define_request_histograms(self, max_model_len: int) -> None:
        tokens = buckets.one_two_five(max_model_len)
        self.ttft = self._histogram(
            "tova_time_to_first_token_seconds", "Arrival to first sampled token.",
            buckets.TIME_TO_FIRST_TOKEN).labels(self.model_name)
        self.itl = self._histogram(
            "tova_inter_token_latency_seconds",
            "Time between consecutive tokens of a choice, as the server receives them.",
            buckets.INTER_TOKEN).labels(self.model_name)
        self.e2e = self._histogram(
            "tova_e2e_request_latency_seconds", "Arrival to the last token of the request.",
            buckets.REQUEST_LATENCY).labels(self.model_name)
        self.queue_time = self._histogram(
            "tova_request_queue_time_seconds", "Arrival to taking a slot.",
            buckets.REQUEST_LATENCY).labels(self.model_name)
        self.request_prompt_tokens = self._histogram(
            "tova_request_prompt_tokens", "Prompt length of each finished request.",
            tokens).labels(self.model_name)
        self.request_generation_tokens = self._histogram(
            "tova_request_generation_tokens",
            "Tokens generated by each finished request (all choices).",
            tokens).labels(self.model_name)

    def _define_step_histograms(self, max_num_seqs: int, max_model_len: int) -> None:
        self.step_duration = self._histogram(
            "tova_step_duration_seconds",
            "Engine step time; phase is prefill if the step ran any prompt tokens.",
            buckets.STEP_DURATION, ("phase",))
        self._step_by_phase = {
            phase: self.step_duration.labels(self.model_name, phase)
            for phase in ("prefill", "decode")
        }
        self.batch_size = self._histogram(
            "tova_batch_size", "Sequences run per engine step.",
            buckets.powers_of_two(max_num_seqs)).labels(self.model_name)
        self.evicted_age = self.register_local(BulkHistogram(
            "tova_evicted_token_age_tokens",
            "How many tokens back each evicted state entry was: what the bounded state forgets.",
            buckets.one_two_five(max_model_len), self._model))

    def _define_http(self) -> None:
        self.http_requests = Counter(
            "tova_http_requests", "HTTP requests by route and status.",
            ["model_name", "method", "route", "status"], registry=self.registry)
        self.http_latency = Histogram(
            "tova_http_request_duration_seconds",
            "HTTP request time, to the last byte of the response (streams included).",
            ["model_name", "method", "route"], buckets=buckets.HTTP_LATENCY,
            registry=self.registry)

    # ----- sources ------------------------------------------------------------------------

    def register_local(self, collector):
        """A collector computed in this process when scraped (both modes render it)."""
        self.registry.register(collector)
        self._local.append(collector)
        return collector

    def bind_gauges(self, stats: Callable[[], StepStats], waiting: Callable[[], float],
                    slots_total: int, memory_bytes: int) -> None:
        """The engine's live counts are read from its latest stats when Prometheus scrapes;
        this front end's waiting requests are written at each step and each scrape."""
        self.register_local(_LiveGauges(stats, self.model_name))
        self._waiting = waiting
        self.slots_total.labels(self.model_name).set(slots_total)
        self.memory_bytes.labels(self.model_name).set(memory_bytes)

    def bind_prefix_cache(self, rows: int, memory_bytes: int) -> None:
        self.prefix_cache_rows.labels(self.model_name).set(rows)
        self.prefix_cache_bytes.labels(self.model_name).set(memory_bytes)

    def set_sequence_bytes(self, by_layer_kind: dict[str, int], saved: int) -> None:
        """The per-sequence state breakdown, constant for the engine's life."""
        for kind, value in by_layer_kind.items():
            self.sequence_bytes.labels(self.model_name, kind).set(value)
        self.sequence_saved_bytes.labels(self.model_name).set(saved)

    def set_engine_info(self, **labels: object) -> None:
        values = {k: str(v) for k, v in labels.items()}
        self.engine_info.labels(model_name=self.model_name, **values).set(1)

    def observe_step(self, stats: StepStats) -> None:
        """The engine's stats callback: runs on the engine client's thread after every
        step, so it must stay cheap (prometheus_client is thread-safe) and must never
        raise: an exception here would stop that thread."""
        try:
            self._observe_step(stats)
        except Exception:
            if not self._step_error_logged:
                self._step_error_logged = True
                logger.exception("metrics: could not record an engine step (logged once)")

    def _observe_step(self, stats: StepStats) -> None:
        self.refresh_waiting()
        if not stats.batch_size:  # the counts after an abort, not a step
            return
        if stats.evicted_age_counts:  # binned by the core before they were sent
            self.evicted_age.observe_counts(stats.evicted_age_counts, stats.evicted_age_sum)
        elif stats.evicted_ages:
            self.evicted_age.observe_many(stats.evicted_ages)
        if not self.observes_engine:
            return
        step = self._step_by_phase.get(stats.phase)
        if step is None:
            step = self.step_duration.labels(self.model_name, stats.phase)
        step.observe(stats.duration_s)
        self.batch_size.observe(stats.batch_size)
        if stats.prompt_tokens:
            self.prompt_tokens.inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self.generation_tokens.inc(stats.generation_tokens)
        if evicted := stats.evicted_count:
            self.evicted_tokens.inc(evicted)
        # A prompt looks the prefix cache up at its first chunk: never in a step without a
        # batch.
        if stats.prefix_cache_queried_tokens:
            self.prefix_cache_queries.inc(stats.prefix_cache_queried_tokens)
            self.prefix_cache_hits.inc(stats.prefix_cache_hit_tokens)

    def count_finished(self, reason: str, choices: int = 1) -> None:
        self.requests.labels(self.model_name, reason).inc(choices)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(self.model_name, method, route, str(status)).inc()
        self.http_latency.labels(self.model_name, method, route).observe(seconds)

    def count_engine_restart(self) -> None:
        if self.observes_engine:
            self.engine_restarts.inc()

    def render(self) -> tuple[bytes, str]:
        self.refresh_waiting()
        if self._shared_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self._shared_dir)
        for collector in self._local:
            registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def refresh_waiting(self) -> None:
        """This front end's waiting requests into its gauge: at each step, each scrape and
        each change of what it has submitted."""
        self.requests_waiting.labels(self.model_name).set(self._waiting())


class _LiveGauges:
    """The engine's counts after its latest step, read at scrape time: the same in every
    front end, since each receives every step's stats."""

    _GAUGES = (
        ("tova_requests_running", "Requests holding slots (prefilling or decoding).",
         "num_running"),
        ("tova_state_slots_used", "State slots in use (one per running choice).", "slots_used"),
        ("tova_prefix_cache_rows_used", "Prefix-cache rows holding a cached prompt prefix.",
         "prefix_cache_rows_used"),
        ("tova_prompt_token_budget",
         "Prompt tokens the latest step could prefill: paced beside running decodes "
         "(--target-itl-ms), else --max-num-batched-tokens.", "prompt_token_budget"),
    )

    def __init__(self, stats: Callable[[], StepStats], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def describe(self) -> Iterator[Metric]:
        for name, doc, _ in self._GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["model_name"])

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, doc, field in self._GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self._model], getattr(stats, field))
            yield family
