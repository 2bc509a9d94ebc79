"""Prometheus metrics for /metrics, in a registry of the app's own (two apps in
one process, as in tests, do not collide).

Latencies are measured here, at the HTTP layer, because that is what a client
sees and it is the same for every engine. Engine figures (running/waiting,
state-pool slots and bytes, token counters) are read from ``engine.stats()`` at
scrape time, so they are never stale.

Beside our ``statex_*`` series, the quantities vLLM also reports carry vLLM's
names, labels (``model_name``, ``engine``) and histogram buckets
(``vllm/v1/metrics/loggers.py``, ``buckets.py``), so a vLLM dashboard reads this
server unchanged; state-pool usage stands in for ``vllm:kv_cache_usage_perc``.
The process metrics (``process_*``, ``python_*``) are prometheus_client's.
"""
from __future__ import annotations

import time

from prometheus_client import (
    GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Histogram,
    disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from statex_serve.engine.base import Engine

PREFIX = "statex"
disable_created_metrics()   # the *_created series double the output and no dashboard reads them
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)

# vLLM's buckets (vllm/v1/metrics/buckets.py), so its dashboard's quantiles mean the same here
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's FinishReason strings: every one is exported from the start, at 0
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def request_tokens_buckets(max_model_len: int) -> list[int]:
    """vLLM's 1-2-5 series up to the context length (``build_1_2_5_buckets``)."""
    buckets, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


def _families(kind, prefix: str, rows, labels: list[str], values: list[str]):
    """One family of ``kind`` (GaugeMetricFamily or CounterMetricFamily) per
    (name, doc, value) row, each with the one sample ``values`` labels."""
    for name, doc, value in rows:
        family = kind(f"{prefix}{name}", doc, labels=labels)
        family.add_metric(values, value)
        yield family


# The engine's figures under our names: (name, help, EngineStats field).
_ENGINE_GAUGES = [
    ("requests_running", "Requests holding state slots (prefilling or decoding).", "running_requests"),
    ("requests_waiting", "Requests queued for a state slot.", "waiting_requests"),
    ("state_pool_slots_total", "State-pool capacity in sequences.", "slots_total"),
    ("state_pool_slots_used", "State-pool slots in use.", "slots_used"),
    ("state_pool_slots_free", "State-pool slots free.", "slots_free"),
    ("state_pool_bytes", "Bytes held by the state pool.", "state_pool_bytes"),
    ("state_bytes_per_sequence", "Bytes of recurrent state per sequence.", "state_bytes_per_sequence"),
]
_ENGINE_COUNTERS = [
    ("prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens_total"),
    ("generation_tokens", "Tokens generated.", "generation_tokens_total"),
    ("engine_requests_finished", "Requests the engine finished.", "requests_finished_total"),
    ("engine_requests_aborted", "Requests aborted (client gone or abort()).", "requests_aborted_total"),
    ("engine_steps", "Engine steps run.", "steps_total"),
]


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        model = self.engine.model_name
        for kind, table in ((GaugeMetricFamily, _ENGINE_GAUGES), (CounterMetricFamily, _ENGINE_COUNTERS)):
            rows = [(name, doc, getattr(s, stat)) for name, doc, stat in table]
            yield from _families(kind, f"{PREFIX}_", rows, ["model"], [model])
        yield from _vllm_engine_metrics(model, s)
        cache = s.extra.get("prefix_cache")
        if cache:
            yield from _prefix_cache_metrics(model, cache)


def _vllm_engine_metrics(model: str, s):
    """vLLM's names for the engine figures (labels model_name, engine="0": one engine)."""
    labels, values = ["model_name", "engine"], [model, "0"]
    usage = s.slots_used / s.slots_total if s.slots_total else 0.0
    yield from _families(GaugeMetricFamily, "vllm:", [
        ("num_requests_running", "Number of requests in model execution batches.", s.running_requests),
        ("num_requests_waiting", "Number of requests waiting to be processed.", s.waiting_requests),
        ("kv_cache_usage_perc", "KV-cache usage (here: state-pool slots in use). 1 means 100 percent usage.", usage),
    ], labels, values)
    yield from _families(CounterMetricFamily, "vllm:", [
        ("prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total),
        ("generation_tokens", "Number of generation tokens processed.", s.generation_tokens_total),
    ], labels, values)


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
    rows = [(name, doc, cache[name]) for name, doc in _PREFIX_CACHE_COUNTERS]
    yield from _families(CounterMetricFamily, f"{PREFIX}_prefix_cache_", rows, ["model"], [model])
    for name, doc in (("bytes", "Bytes of prefix state snapshots held, by tier (device, host)."),
                      ("budget_bytes", "Prefix-cache byte budget, by tier (device, host)."),
                      ("entries", "Prefix state snapshots held, by tier (device, host).")):
        key = {"bytes": "bytes", "budget_bytes": "budget", "entries": "entries"}[name]
        g = GaugeMetricFamily(f"{PREFIX}_prefix_cache_{name}", doc, labels=["model", "tier"])
        for tier in ("device", "host"):
            g.add_metric([model, tier], cache[f"{key}_{tier}"])
        yield g
    yield from _families(GaugeMetricFamily, f"{PREFIX}_prefix_cache_",
                         [("pinned", "Pinned prefixes.", cache["pinned"])], ["model"], [model])


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
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.vllm = _VLLMHistograms(self.registry, engine.model_name, engine.max_model_len)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _VLLMHistograms:
    """The per-request series vLLM reports, under its names, labels and buckets.
    vLLM fans n > 1 out into n requests, so here each sequence counts as one."""

    def __init__(self, registry: CollectorRegistry, model: str, max_model_len: int):
        labels, values = ["model_name", "engine"], (model, "0")

        def histogram(name, doc, buckets):
            return Histogram(f"vllm:{name}", doc, labels, buckets=buckets, registry=registry).labels(*values)

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              VLLM_TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             VLLM_ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", VLLM_ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             VLLM_REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", VLLM_REQUEST_LATENCY_BUCKETS)
        token_buckets = request_tokens_buckets(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                       token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                           token_buckets)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=registry)
        self.success = {reason: success.labels(*values, reason) for reason in VLLM_FINISH_REASONS}


class SequenceTimer:
    """The latencies and counts of one generated sequence: TTFT and
    inter-token gaps as tokens arrive, the rest when it ends."""

    def __init__(self, metrics: Metrics, arrival: float, prompt_tokens: int = 0):
        self.metrics = metrics
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.queue_noted = False

    def queued(self, seconds: float | None) -> None:
        """The engine's time from arrival to a state slot (once; None: the engine does not say)."""
        if seconds is None or self.queue_noted:
            return
        self.queue_noted = True
        self.metrics.vllm.queue.observe(max(seconds, 0.0))

    def tokens_arrived(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
            self.metrics.vllm.ttft.observe(now - self.arrival)
        else:       # vLLM observes the gap once per output that brought tokens
            self.metrics.vllm.itl.observe(now - self.last)
        self.last = now
        self.tokens += count

    def finished(self, reason: str | None = None) -> None:
        vllm = self.metrics.vllm
        if reason in vllm.success:
            vllm.success[reason].inc()
        vllm.prompt_tokens.observe(self.prompt_tokens)
        vllm.generation_tokens.observe(self.tokens)
        end = self.last if self.last is not None else time.monotonic()
        vllm.e2e.observe(end - self.arrival)
        if self.first is None:
            return
        self.metrics.e2e.observe(self.last - self.arrival)
        if self.tokens > 1:
            tpot = (self.last - self.first) / (self.tokens - 1)
            self.metrics.tpot.observe(tpot)
            vllm.tpot.observe(tpot)
