"""Prometheus metrics of the server (names follow vLLM's, with a fromage_ prefix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .protocol import finish_reason

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, counts, cache_bytes):
        """`counts()` -> (running, waiting) requests, `cache_bytes()` -> (the running requests' KV caches, the
        prefix cache) in bytes, read at each scrape."""
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("fromage_time_to_first_token_seconds", "Time from request to its first text or image",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fromage_inter_token_latency_seconds", "Time between a request's successive outputs",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fromage_e2e_request_latency_seconds", "Time from request to its last output",
                             buckets=LATENCY_BUCKETS, registry=r)
        Gauge("fromage_num_requests_running", "Requests in the decoding batch", registry=r).set_function(
            lambda: counts()[0])
        Gauge("fromage_num_requests_waiting", "Requests queued for a slot", registry=r).set_function(
            lambda: counts()[1])
        memory = Gauge("fromage_kv_cache_bytes", "KV cache memory: the running requests' caches, the prefix cache",
                       ["kind"], registry=r)
        memory.labels("running").set_function(lambda: cache_bytes()[0])
        memory.labels("prefix").set_function(lambda: cache_bytes()[1])
        self.prompt_tokens = Counter("fromage_prompt_tokens", "Prompt positions prefilled (images count k each)",
                                     registry=r)
        self.cached_prompt_tokens = Counter("fromage_prompt_tokens_cached",
                                            "Prompt positions copied from a cached prefix, not computed", registry=r)
        self.generation_tokens = Counter("fromage_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("fromage_request", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)

    def finished(self, result, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        self.generation_tokens.inc(len(result.token_ids))
        self.cached_prompt_tokens.inc(result.cached_positions)
        self.requests.labels(finish_reason(result)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
