"""Disk limits of the service's stores (the prediction log, the review queue): retention by age and size,
oldest first; a warning that repeats at most once a minute; and the Prometheus collector that reports what
the stores keep, delete and drop.

A limit of 0 means "no limit". Retention runs in the store's own writer (the log's writer thread, the queue's
add in the thread pool), never on the event loop; a scrape of /metrics reads counters only, no disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lensmith.params import ServeParams

DAY_S = 86_400.0
WARN_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Retention:
    """How much a store keeps: at most `max_bytes` (0: any size) of items at most `max_age_s` old (0: any age)."""

    max_bytes: int = 0
    max_age_s: float = 0.0

    def too_old(self, mtime: float, now: float) -> bool:
        return self.max_age_s > 0 and mtime < now - self.max_age_s

    def too_big(self, total_bytes: int) -> bool:
        return self.max_bytes > 0 and total_bytes > self.max_bytes


def log_retention(params: ServeParams) -> Retention:
    return Retention(params.log_max_bytes, params.log_max_age_days * DAY_S)


def review_retention(params: ServeParams) -> Retention:
    return Retention(params.review_max_bytes, params.review_max_age_days * DAY_S)


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    mtime: float


def stored_files(directory: Path, pattern: str) -> list[StoredFile]:
    """The files matching `pattern` in `directory`, oldest (last written) first; vanished ones are skipped."""
    found = []
    for path in Path(directory).glob(pattern):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        found.append(StoredFile(path, info.st_size, info.st_mtime))
    return sorted(found, key=lambda f: (f.mtime, f.path.name))


def files_to_delete(files: list[StoredFile], retention: Retention, now: float, keep: Iterable[Path] = ()) -> list[tuple[StoredFile, str]]:
    """(file, "age" | "size") for each file retention removes: every file older than max_age, then the oldest
    of the rest until they fit in max_bytes. `files` oldest first; the files in `keep` are never removed."""
    kept_paths = set(keep)
    doomed: list[tuple[StoredFile, str]] = []
    survivors = []
    for file in files:
        if file.path not in kept_paths and retention.too_old(file.mtime, now):
            doomed.append((file, "age"))
        else:
            survivors.append(file)
    total = sum(f.size for f in survivors)
    for file in survivors:
        if not retention.too_big(total):
            break
        if file.path not in kept_paths:
            doomed.append((file, "size"))
            total -= file.size
    return doomed


class RateLimitedLog:
    """Logs a recurring problem at most once per `interval_s`, counting the repeats it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = WARN_INTERVAL_S) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._held_back = 0

    def log(self, level: int, message: str, *args: Any) -> bool:
        """Log now unless one was logged less than interval_s ago; True when this one was logged."""
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._held_back += 1
                return False
            held_back, self._held_back, self._next = self._held_back, 0, now + self.interval_s
        suffix = f" ({held_back} more like this in the last {self.interval_s:.0f} s not logged)" if held_back else ""
        self.logger.log(level, message + suffix, *args, stacklevel=2)
        return True


# ---- Prometheus ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of one store's counters (counters only grow; kept_* are the last measured sizes)."""

    kept_items: int
    kept_bytes: int
    removed: dict[str, int]  # reason (age, size, ...) -> items/files retention removed
    dropped: dict[str, int]  # reason -> records/items that never reached the disk
    write_errors: dict[str, int]  # errno name (ENOSPC, EIO, ...) -> failed writes
    backlog: int = 0


class Store(Protocol):
    def stats(self) -> StoreStats: ...


def counter(name: str, documentation: str, values: dict[str, int], label: str) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


class StorageCollector(Collector):
    """The stores' counters at scrape time: lensmith_prediction_log_* and lensmith_review_queue_*."""

    def __init__(self, prediction_log: Store, review_queue: Store) -> None:
        self.stores = {"prediction_log": (prediction_log, "records", "files"), "review_queue": (review_queue, "items", "items")}

    def collect(self) -> Iterator[Any]:
        for prefix, (store, unit, kept_unit) in self.stores.items():
            stats, name = store.stats(), f"lensmith_{prefix}"
            yield GaugeMetricFamily(f"{name}_{kept_unit}", f"{kept_unit} kept on disk", value=stats.kept_items)
            yield GaugeMetricFamily(f"{name}_bytes", "bytes kept on disk", value=stats.kept_bytes)
            yield counter(f"{name}_removed_{kept_unit}", f"{kept_unit} deleted by retention, by reason (age, size)", stats.removed, "reason")
            yield counter(f"{name}_dropped_{unit}", f"{unit} never written, by reason (backlog_full, write_error, ...)", stats.dropped, "reason")
            yield counter(f"{name}_write_errors", "failed writes, by errno (ENOSPC = disk full)", stats.write_errors, "errno")
            if prefix == "prediction_log":
                yield GaugeMetricFamily(f"{name}_backlog_{unit}", f"{unit} waiting in memory for the writer", value=stats.backlog)
