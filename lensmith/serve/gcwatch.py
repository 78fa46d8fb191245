"""Python's garbage-collector pauses in the service: every collection stops the event loop and the runner
threads' Python code, and under overload a full (generation 2) one over the many objects of a busy process
shows up as a latency spike. `lensmith_gc_pause_seconds{generation}` records each collection; a pause of
`SLOW_PAUSE_S` or more is also logged."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)
SLOW_PAUSE_S = 0.1


class GcPauses:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "lensmith_gc_pause_seconds", "Python garbage-collection pauses of the service process", ["generation"],
            registry=registry, buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self._started: float | None = None
        self.installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        generation = info.get("generation", 0)
        self.histogram.labels(str(generation)).observe(seconds)
        if seconds >= SLOW_PAUSE_S:
            log.warning("garbage collection of generation %s paused the service %.0f ms (%s objects collected)", generation, seconds * 1000, info.get("collected"))

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False
