"""Prometheus metrics of the service (its own registry, served at /metrics) and the middleware that counts
and times every request per route template."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lensmith.livequality import LiveQuality
from lensmith.serve.admission import REASONS, Admission
from lensmith.serve.apierrors import loggable
from lensmith.serve.models import ServedModel

log = logging.getLogger("lensmith.serve")


FAILURE_LINES_PER_S = 20  # failed requests logged one line each per second; the rest are counted in one line


class LineLimiter:
    """At most `per_second` lines a second; the others are counted and reported in one line when the next
    second's first line comes. Under overload every refused request would otherwise write a line (thousands a
    second), which costs the event loop the CPU the shedding was meant to save."""

    def __init__(self, per_second: int = FAILURE_LINES_PER_S) -> None:
        self.per_second = per_second
        self.window, self.lines, self.suppressed = 0, 0, 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                log.info("%d more failed requests were not logged one by one (lensmith_requests_total counts them all)", self.suppressed)
            self.window, self.lines, self.suppressed = now, 0, 0
        if self.lines < self.per_second:
            self.lines += 1
            return True
        self.suppressed += 1
        return False


class Metrics:
    def __init__(self) -> None:
        self.failure_lines = LineLimiter()
        self.registry = CollectorRegistry()
        self.requests = Counter("lensmith_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "lensmith_request_latency_seconds", "Request latency", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.confidence = Histogram(
            "lensmith_prediction_confidence", "Top-1 confidence", registry=self.registry,
            buckets=tuple(np.round(np.linspace(0.1, 1.0, 10), 2)),
        )
        self.predictions = Counter("lensmith_predictions", "Predictions per class", ["label"], registry=self.registry)
        self.review = Counter("lensmith_review_items", "Items put in the review queue", ["reason"], registry=self.registry)
        self.batch = Histogram("lensmith_batch_size", "Images per session run", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.inference = Histogram(
            "lensmith_inference_seconds", "Seconds per session run (one batch)", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.model = Gauge("lensmith_model_info", "The model being served (value 1)", ["version", "variant", "provider"], registry=self.registry)
        self.reloads = Counter("lensmith_model_reloads", "Model reloads", ["result"], registry=self.registry)
        self.reload_failures = Counter(
            "lensmith_model_reload_failures", "Models that failed to load or warm up (the one being served stayed)", registry=self.registry
        )
        self.degraded = Gauge(
            "lensmith_model_degraded", "1 while an older model serves because the newest failed to load or warm up", registry=self.registry
        )
        self.queue_depth = Gauge(
            "lensmith_queue_depth", "Predict requests queued: decoding, or waiting for a decode slot or a session run", registry=self.registry
        )
        self.rejected = Counter(
            "lensmith_rejected_requests", "Predict requests refused to protect the service", ["reason"], registry=self.registry
        )
        self.queue_wait = Histogram(
            "lensmith_queue_wait_seconds",
            "Seconds from a predict request's admission to the start of its session run (decoding, waiting for a decode slot or a run)",
            registry=self.registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # the children looked up once: refusals come by the thousand a second under overload
        self.rejected_by_reason = {reason: self.rejected.labels(reason) for reason in REASONS}

    def count_request(self, scope: dict[str, Any], endpoint: str, status: int, seconds: float) -> None:
        """A request's count and latency per route template; failures also leave a (rate-limited) log line."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400 and self.failure_lines.allow():  # with serve.access_log off, failures still leave a line
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s from %s", loggable(scope.get("method")), loggable(scope.get("path")), status, loggable(client[0]))

    def watch_admission(self, admission: Admission, images_ahead: Callable[[], int]) -> None:
        """Gauges of admission by expected wait (NaN until a first session run was measured with an auto budget)."""

        def nan_if_none(value: float | None) -> float:
            return float("nan") if value is None else value

        Gauge(
            "lensmith_admission_budget_seconds", "Longest expected wait for inference a predict request is admitted with now (serve.max_queue_wait_ms, or serve.overload_queue_wait_ms while overloaded)",
            registry=self.registry,
        ).set_function(lambda: nan_if_none(admission.budget_s()))
        Gauge(
            "lensmith_admission_overloaded", "1 while overload mode holds the queue short (serve.overload_hold_s after the normal budget overflowed)",
            registry=self.registry,
        ).set_function(lambda: float(admission.overloaded()))
        Gauge(
            "lensmith_admission_expected_wait_seconds", "Expected wait for inference of a predict request arriving now",
            registry=self.registry,
        ).set_function(lambda: nan_if_none(admission.expected_wait_s(images_ahead())))
        Gauge(
            "lensmith_inference_seconds_per_image", "Mean seconds per image of recent session runs (weighted to the newest)",
            registry=self.registry,
        ).set_function(lambda: nan_if_none(admission.service_time.per_image_s))

    def watch_live_quality(self, live: LiveQuality) -> None:
        """Gauges of the running estimate from corrections (NaN until a correction of that kind arrived)."""
        self.feedback_outcomes = Counter(
            "lensmith_feedback_outcomes", "Corrections of served decisions by what they say (caught, missed, false_alarm, ...)",
            ["outcome"], registry=self.registry,
        )

        def figure(key: str) -> float:
            value = live.figures()[key]
            return float("nan") if value is None else float(value)

        for name, key, text in (
            ("lensmith_live_defect_recall", "defect_recall", "Defect recall of served decisions per the last corrections"),
            ("lensmith_live_false_alarm_rate", "false_alarm_rate", "False-alarm rate of served decisions per the last corrections"),
            ("lensmith_live_defects", "defects", "Corrected images that were defects, in the live window"),
            ("lensmith_live_good", "good", "Corrected images that were good, in the live window"),
        ):
            Gauge(name, text, registry=self.registry).set_function(lambda key=key: figure(key))

    def set_quality_floors(self, floors: dict[str, float]) -> None:
        """The gate's floors beside the live figures, so alert rules compare them without copying numbers."""
        gauge = Gauge("lensmith_quality_floor", "A quality floor of the gate (params), by name", ["name"], registry=self.registry)
        for name, value in floors.items():
            gauge.labels(name).set(value)

    def set_model(self, model: ServedModel) -> None:
        self.model.clear()
        self.model.labels(model.version, model.variant, model.onnx.provider).set(1)


class MetricsMiddleware:
    """Count requests and time them per route template (never per raw path: bounded label values)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            self.metrics.count_request(scope, getattr(route, "path", None) or "unmatched", status, time.perf_counter() - start)
