"""Prometheus metrics for /metrics, in a registry of the app's own (two apps in
one process, as in tests, do not collide).

Latencies are measured here, at the HTTP layer, because that is what a client
sees and it is the same for every engine. Engine figures (running/waiting,
state-pool slots and bytes, token counters) are read from ``engine.stats()`` at
scrape time, so they are never stale.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from statex_serve.engine.base import Engine

PREFIX = "statex"
disable_created_metrics()   # the *_created series double the output and no dashboard reads them
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        model = self.engine.model_name
        gauges = [
            ("requests_running", "Requests holding state slots (prefilling or decoding).", s.running_requests),
            ("requests_waiting", "Requests queued for a state slot.", s.waiting_requests),
            ("state_pool_slots_total", "State-pool capacity in sequences.", s.slots_total),
            ("state_pool_slots_used", "State-pool slots in use.", s.slots_used),
            ("state_pool_slots_free", "State-pool slots free.", s.slots_free),
            ("state_pool_bytes", "Bytes held by the state pool.", s.state_pool_bytes),
            ("state_bytes_per_sequence", "Bytes of recurrent state per sequence.", s.state_bytes_per_sequence),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["model"])
            g.add_metric([model], value)
            yield g
        counters = [
            ("prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("engine_requests_finished", "Requests the engine finished.", s.requests_finished_total),
            ("engine_requests_aborted", "Requests aborted (client gone or abort()).", s.requests_aborted_total),
            ("engine_steps", "Engine steps run.", s.steps_total),
        ]
        for name, doc, value in counters:
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model"])
            c.add_metric([model], value)
            yield c
        cache = s.extra.get("prefix_cache")
        if cache:
            yield from _prefix_cache_metrics(model, cache)


_PREFIX_CACHE_COUNTERS = [
    ("hits", "Requests that restored a stored prefix state instead of prefilling it."),
    ("misses", "Requests that found no stored prefix."),
    ("tokens_saved", "Prompt tokens restored from the prefix cache instead of prefilled."),
    ("stores", "Prefix state snapshots written."),
    ("store_skipped", "Snapshots not stored for lack of room (budgets full of pinned or in-use snapshots)."),
    ("evictions", "Snapshots dropped to make room (least recently used first)."),
    ("spills", "Snapshots moved from the device to host memory."),
]


def _prefix_cache_metrics(model: str, cache: dict):
    for name, doc in _PREFIX_CACHE_COUNTERS:
        c = CounterMetricFamily(f"{PREFIX}_prefix_cache_{name}", doc, labels=["model"])
        c.add_metric([model], cache[name])
        yield c
    for name, doc in (("bytes", "Bytes of prefix state snapshots held, by tier (device, host)."),
                      ("budget_bytes", "Prefix-cache byte budget, by tier (device, host)."),
                      ("entries", "Prefix state snapshots held, by tier (device, host).")):
        key = {"bytes": "bytes", "budget_bytes": "budget", "entries": "entries"}[name]
        g = GaugeMetricFamily(f"{PREFIX}_prefix_cache_{name}", doc, labels=["model", "tier"])
        for tier in ("device", "host"):
            g.add_metric([model, tier], cache[f"{key}_{tier}"])
        yield g
    g = GaugeMetricFamily(f"{PREFIX}_prefix_cache_pinned", "Pinned prefixes.", labels=["model"])
    g.add_metric([model], cache["pinned"])
    yield g


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "From request arrival to the first generated token.", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Per sequence: (last token time - first token time) / (tokens - 1).",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "From request arrival to its last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """TTFT / TPOT of one generated sequence, observed when it ends."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def tokens_arrived(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        self.last = now
        self.tokens += count

    def finished(self) -> None:
        if self.first is None:
            return
        self.metrics.e2e.observe(self.last - self.arrival)
        if self.tokens > 1:
            self.metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))
