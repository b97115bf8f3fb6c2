"""Prometheus metrics of the HTTP service, exposed at ``/metrics`` (prometheus-client does the format).

Why a registry per app: tests and embedders may build several apps in one process; the
default global registry would refuse the second set of metric names.

What is measured: requests by route template, method and status (so errors by status
come free); latency histograms per route; texts waiting in the batching queue; per round
of the batching worker, the requests and texts it served, its tokens and its duration
(tokens/s = ``rate(m3search_tokens_total[1m])``); documents written but not yet indexed, and
the deferred index builds (count and seconds).
"""

from __future__ import annotations

import time
from typing import Any

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("the HTTP server's metrics need prometheus-client: pip install 'm3search[server]'") from None

__all__ = ["Metrics", "MetricsMiddleware", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PRIORITY_NAMES = {0: "interactive", 1: "background"}
#: HTTP's methods (RFC 9110, and PATCH); any other a client sends is counted as ``other``.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class Metrics:
    """The service's metrics in their own registry; also the batching worker's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "m3search_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "m3search_request_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("m3search_queue_texts", "Texts waiting or being encoded in the batching queue", registry=r)
        self.batch_requests = Histogram(
            "m3search_batch_requests",
            "Requests served per batching round",
            ["priority"],
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.batch_texts = Histogram(
            "m3search_batch_texts", "Texts encoded per batching round", ["priority"], buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "m3search_batch_seconds", "Duration of a batching round", ["priority"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("m3search_tokens", "Tokens encoded", ["priority"], registry=r)
        self.texts = Counter("m3search_texts", "Texts encoded", ["priority"], registry=r)
        self.unindexed = Gauge(
            "m3search_unindexed_documents",
            "Documents written through /documents whose indexes are not built yet (searched by a scan until then)",
            registry=r,
        )
        self.index_builds = Histogram(
            "m3search_index_build_seconds",
            "Deferred index builds of documents written through /documents, and their duration",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    # BatchObserver
    def queue_depth(self, texts: int) -> None:
        self.queue.set(texts)

    def round_done(self, priority: int, requests: int, texts: int, tokens: int, seconds: float) -> None:
        name = _PRIORITY_NAMES.get(priority, str(priority))
        self.batch_requests.labels(name).observe(requests)
        self.batch_texts.labels(name).observe(texts)
        self.batch_seconds.labels(name).observe(seconds)
        self.tokens.labels(name).inc(tokens)
        self.texts.labels(name).inc(texts)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: count and time every HTTP request by its route template.

    Unmatched paths share one label (``unmatched``), and methods that HTTP does not define one (``other``; a server
    takes any token as a method), so scanners cannot grow the series.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        started = time.perf_counter()

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(name, method if method in _METHODS else "other", str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
