"""Prometheus metrics of one service (its own registry, so several apps in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Endpoints get their own label; any other path is counted as "other" (bounded label values).
ENDPOINTS = ("/v1/chat/completions", "/v1/retrieve", "/v1/models", "/health", "/metrics")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], float], busy: Callable[[], float], passages: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragcompress_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=r,
        )
        self.errors = Counter(
            "ragcompress_request_errors",
            "requests that ended in an error, by endpoint and error code",
            ["endpoint", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            "ragcompress_ttft_seconds",
            "time to first token from the stored caches (load, verify, assemble, prefill the question)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ragcompress_generation_seconds",
            "time from the start of generation to its last token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ragcompress_queue_wait_seconds",
            "time a request waited for the generation thread",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.bytes_read = Counter(
            "ragcompress_bytes_read", "stored bytes of the passage caches read to answer", registry=r
        )
        self.batch_size = Histogram(
            "ragcompress_batch_size",
            "requests decoded together in the batch that answered a request (1: alone)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.tokens = Counter("ragcompress_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("ragcompress_queue_depth", "requests waiting for the generation thread", registry=r)
        self.queue_depth.set_function(waiting)
        self.busy = Gauge("ragcompress_busy", "1 while a request is being generated", registry=r)
        self.busy.set_function(busy)
        self.passages = Gauge("ragcompress_store_passages", "passages the store held at the last request", registry=r)
        self.passages.set_function(passages)

    def endpoint(self, path: str) -> str:
        return path if path in ENDPOINTS else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
