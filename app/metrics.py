"""Prometheus metrics of the gateway.

Request counts are counted in this process; job counts by state, the job duration histogram and
the queue depth are read from the job store and the broker at scrape time, so every gateway
replica reports the same, true numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.queue import JobQueue
from service.store import DURATION_BUCKETS_S, Store

log = logging.getLogger(__name__)


class _StoreCollector(Collector):
    def __init__(self, store: Store, queue: JobQueue) -> None:
        self.store, self.queue = store, queue

    def collect(self) -> Iterator[Metric]:
        try:
            jobs = GaugeMetricFamily("scsnet_jobs", "Jobs in the store by state", labels=["state"])
            for state, count in self.store.counts_by_state().items():
                jobs.add_metric([state], count)
            yield jobs
            counts, total, seconds = self.store.duration_histogram()
            buckets = [(f"{b:g}", c) for b, c in zip(DURATION_BUCKETS_S, counts)] + [("+Inf", total)]
            yield HistogramMetricFamily(
                "scsnet_job_duration_seconds", "Run time of succeeded jobs", buckets=buckets, sum_value=seconds
            )
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the store is down
            log.warning("job metrics unavailable: %s", type(exc).__name__)
        try:
            yield GaugeMetricFamily("scsnet_queue_depth", "Messages waiting in the broker queue", value=self.queue.depth())
        except Exception as exc:  # noqa: BLE001 - nor because the broker is
            log.warning("queue depth unavailable: %s", type(exc).__name__)


class Metrics:
    """The gateway's metric registry."""

    def __init__(self, store: Store, queue: JobQueue) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "scsnet_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "scsnet_http_request_duration_seconds", "Time to answer HTTP requests", ["route"], registry=self.registry
        )
        self.registry.register(_StoreCollector(store, queue))


class MetricsMiddleware:
    """Counts every request by method, route template and status (pure ASGI: never buffers
    the streamed upload)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: dict[str, Any] = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
