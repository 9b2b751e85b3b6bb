"""Prometheus metrics for one server app.

Each app gets its own ``CollectorRegistry`` so several apps (tests, multiple
models in one process) never collide on metric names in the global registry.
Engine gauges read the engine client's stats snapshot at scrape time instead of
being pushed, so they cost nothing between scrapes.
"""
from __future__ import annotations

import time
from typing import Callable

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

OUTCOMES = ("ok", "client_error", "server_error", "aborted", "rejected")


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("plugserve_requests", "Requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("plugserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("plugserve_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("plugserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("plugserve_time_per_output_token_seconds",
                              "Mean inter-token time after the first token, per request",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("plugserve_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        for name, key, doc in (
            ("plugserve_num_requests_running", "num_running", "Requests in the running batch"),
            ("plugserve_num_requests_waiting", "num_waiting", "Requests waiting to be scheduled"),
            ("plugserve_kv_cache_usage_ratio", "kv_cache_usage", "Fraction of KV cache blocks in use"),
            ("plugserve_prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prefix cache hit rate"),
            ("plugserve_num_kv_blocks_used", "num_kv_blocks_used", "KV cache blocks in use"),
        ):
            Gauge(name, doc, registry=r).set_function(lambda key=key: float(stats().get(key, 0)))
        for outcome in OUTCOMES:  # export zeros so rates work before the first event
            for endpoint in ("completions", "chat"):
                self.requests.labels(endpoint, outcome)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Tracks one request's latency milestones and reports them once."""

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self.metrics, self.endpoint = metrics, endpoint
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self._reported = False

    def on_tokens(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.metrics.ttft.observe(self.first_token - self.start)

    def finish(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0,
               max_choice_tokens: int = 0) -> None:
        if self._reported:
            return
        self._reported = True
        m = self.metrics
        m.requests.labels(self.endpoint, outcome).inc()
        if outcome != "ok":
            return
        now = time.perf_counter()
        m.e2e.observe(now - self.start)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        if self.first_token is not None and max_choice_tokens > 1:
            m.tpot.observe((now - self.first_token) / (max_choice_tokens - 1))
