"""The prediction log: append-only JSON lines in size-rotated files (never rewritten, never truncated).

Files are named predictions-<UTC start time>-<pid>-<n>.jsonl, so several server processes and restarts
never write into each other's files; drift monitoring reads them all in name order.

`append` only hands the records to one writer thread, which encodes them as JSON and writes and flushes
whatever has accumulated in one write, in append order, at most `interval_s` after the append: no file I/O
on the request path, and no thread wake-up per request either (each one is a GIL hand-over that stalls the
event loop). `flush` waits until everything appended so far is written; `close` (the service's shutdown)
writes every record handed over before it returns. A failed write (disk full, permissions) is retried with
the records kept in memory and logged as an error (at most once a minute); while it fails, the records kept
in memory are capped at `max_backlog` (serve.log_max_backlog): beyond it `append` drops new records, counts
them (`stats().dropped["backlog_full"]`) and warns at most once a minute. A full disk so degrades the log,
never the predictions. Only a `close` that still cannot write reports, as an error, how many were lost.
An interpreter exit that skipped the service's shutdown still writes them (atexit); only a hard kill
(SIGKILL, power loss) can lose the records of the last `interval_s`. `background=False` writes
synchronously inside `append` instead (a failed write drops the records and counts them; append never raises it).

Retention (serve.log_max_age_days, serve.log_max_bytes): the writer deletes whole files, least recently
written first, when they are older than the age limit, then until all files fit in the size limit; never
the file it is writing. It checks when it starts a file and at most once a minute after writes.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from lensmith.serve.storage import RateLimitedLog, Retention, StoreStats, files_to_delete, stored_files

PREFIX = "predictions-"
MAX_PENDING = 10_000  # records held before the writer is woken early
DEFAULT_MAX_BACKLOG = 20_000  # records kept in memory while writes fail (serve.log_max_backlog)
RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # waits between attempts after a failed write, then 5 s each
RETENTION_INTERVAL_S = 60.0  # retention checks between file rotations

log = logging.getLogger("lensmith.serve")


class PredictionLogClosed(RuntimeError):
    """append() after close(): the record would never be written."""


class PredictionLog:
    def __init__(
        self,
        directory: Path,
        rotate_bytes: int,
        *,
        background: bool = True,
        interval_s: float = 0.05,
        retention: Retention = Retention(),
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.background = background
        self.interval_s = interval_s
        self.retention = retention
        self.max_backlog = max_backlog
        self._lock = threading.Lock()  # the file handle and retention
        self._handle: Any = None
        self._written = 0
        self._count = 0
        self._next_retention = 0.0  # monotonic time of the next retention check
        self._write_failures = RateLimitedLog(log)
        self._drops = RateLimitedLog(log)
        # counters for /metrics, guarded by _cond
        self._kept_files = 0
        self._kept_bytes = 0
        self._removed = {"age": 0, "size": 0}
        self._dropped = {"backlog_full": 0, "write_error": 0, "shutdown": 0}
        self._write_errors: dict[str, int] = {}
        # background writer state, all guarded by _cond
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._appended = 0  # records handed over so far
        self._done = 0  # records written (or, after a final failure, given up on)
        self._closed = False
        self._flush_requests = 0
        self._idle = False  # the writer waits for an append (rather than collecting for interval_s)
        self._thread: threading.Thread | None = None
        self.lost = 0  # records a close() could not write

    # ---- files ---------------------------------------------------------------------------------------

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        while True:
            # microsecond stamp (names sort oldest first) + a random tag: two writers never share a name
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
            path = self.directory / f"{PREFIX}{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{self._count:04d}.jsonl"
            try:
                # "x": fail rather than append to a file this writer did not start
                self._handle = open(path, "x", encoding="utf-8")  # noqa: SIM115 - closed on rotation/close
                break
            except FileExistsError:
                continue
        self._written = 0
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Retention, called with _lock held. Its failures are logged, never raised: the records are written
        by then (or about to be), and a raise would have them written twice by the retry."""
        self._next_retention = time.monotonic() + RETENTION_INTERVAL_S
        try:
            self._delete_old_files()
        except OSError as exc:
            self._write_failures.log(logging.WARNING, "prediction log: retention in %s failed (%s)", self.directory, exc)

    def _delete_old_files(self) -> None:
        """Delete the files retention no longer keeps (never the one being written); measure what is kept."""
        files = stored_files(self.directory, f"{PREFIX}*.jsonl")
        current = Path(self._handle.name) if self._handle is not None else None
        doomed = files_to_delete(files, self.retention, time.time(), keep=[current] if current else [])
        removed = {"age": 0, "size": 0}
        for file, reason in doomed:
            try:
                file.path.unlink()
            except FileNotFoundError:
                pass  # another writer's retention got there first
            except OSError as exc:
                log.warning("prediction log: could not delete %s (%s)", file.path, exc)
                continue
            removed[reason] += 1
        gone = {f.path for f, _ in doomed}
        with self._cond:
            self._kept_files = sum(1 for f in files if f.path not in gone)
            self._kept_bytes = sum(f.size for f in files if f.path not in gone)
            for reason, n in removed.items():
                self._removed[reason] += n

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Write and flush `records`, starting a new file whenever the current one reached rotate_bytes."""
        lines = [json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records]
        with self._lock:
            start, total = 0, 0
            while start < len(lines):
                if self._handle is None or self._written >= self.rotate_bytes:
                    self._open_next()
                end, size = start, 0
                while end < len(lines) and (end == start or self._written + size < self.rotate_bytes):
                    size += len(lines[end].encode())
                    end += 1
                self._handle.write("".join(lines[start:end]))
                self._written += size
                total += size
                start = end
            self._handle.flush()
            with self._cond:
                self._kept_bytes += total
            if time.monotonic() >= self._next_retention:
                self._apply_retention()

    # ---- the writer thread ---------------------------------------------------------------------------

    def append(self, records: list[dict[str, Any]]) -> None:
        """Log `records` (JSON-serialisable dicts); returns at once in background mode."""
        if not records:
            return
        if not self.background:
            self._write_or_drop(records)
            return
        with self._cond:
            if self._closed:
                raise PredictionLogClosed(f"the prediction log in {self.directory} is closed; {len(records)} record(s) not logged")
            room = max(self.max_backlog - (self._appended - self._done), 0)
            dropped = max(len(records) - room, 0)
            if dropped:
                records = records[:room]
                self._dropped["backlog_full"] += dropped
            if records:
                self._enqueue(records)
        if dropped:
            self._drops.log(
                logging.WARNING,
                "prediction log: %d record(s) dropped: %d are waiting for the disk already (serve.log_max_backlog); "
                "predictions are still answered", dropped, self.max_backlog,
            )

    def _write_or_drop(self, records: list[dict[str, Any]]) -> None:
        """Synchronous mode: write now; a failed write drops the records (counted), never raises."""
        try:
            self._write(records)
        except OSError as exc:
            self._drop_handle()
            with self._cond:
                self._dropped["write_error"] += len(records)
            self._count_write_error(exc)
            self._write_failures.log(logging.ERROR, "prediction log: write to %s failed (%s); %d record(s) dropped",
                                     self.directory, exc, len(records))

    def _count_write_error(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "other")
        with self._cond:
            self._write_errors[name] = self._write_errors.get(name, 0) + 1

    def _enqueue(self, records: list[dict[str, Any]]) -> None:
        """Hand records to the writer thread (starting it on first use); called with _cond held."""
        self._pending.extend(records)
        self._appended += len(records)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lensmith-predlog", daemon=True)
            self._thread.start()
            # an interpreter exit that skipped the service's shutdown still writes what was accepted
            atexit.register(_close_at_exit, weakref.ref(self))
        if self._idle or len(self._pending) >= MAX_PENDING:  # else the writer is already collecting
            self._idle = False
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._idle = True
                    self._cond.wait()  # the first append after a quiet spell, flush or close wakes it
                self._idle = False
                if not self._pending:
                    return  # closed and drained
                # let more records arrive for up to interval_s, then write them all in one go
                deadline = time.monotonic() + self.interval_s
                while not self._closed and self._flush_requests == 0 and len(self._pending) < MAX_PENDING:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch, self._pending = self._pending, []
                self._flush_requests = 0
            self._write_with_retries(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _write_with_retries(self, batch: list[dict[str, Any]]) -> None:
        attempt = 0
        while True:
            try:
                self._write(batch)
                if attempt:
                    log.warning("prediction log: written again after %d failed attempt(s)", attempt)
                return
            except OSError as exc:
                self._drop_handle()
                self._count_write_error(exc)
                with self._cond:
                    closing = self._closed
                    backlog = self._appended - self._done
                if closing and attempt >= 1:
                    self.lost += len(batch)
                    with self._cond:
                        self._dropped["shutdown"] += len(batch)
                    log.error("prediction log: could not write %d record(s) before shutdown (%s); ids: %s",
                              len(batch), exc, [r.get("id") for r in batch][:20])
                    return
                self._write_failures.log(
                    logging.ERROR,
                    "prediction log: write to %s failed (%s); %d record(s) kept in memory (at most %d: "
                    "serve.log_max_backlog, newer ones are dropped), retrying",
                    self.directory, exc, backlog, self.max_backlog,
                )
                with self._cond:
                    self._cond.wait(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1

    def _drop_handle(self) -> None:
        """After a failed write the file may end in a partial line: continue in a new file."""
        with self._lock:
            if self._handle is not None:
                try:
                    self._handle.close()
                except OSError:
                    pass
                self._handle = None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record appended before this call is written; False on timeout."""
        if not self.background:
            return True
        with self._cond:
            target = self._appended
            if self._done < target:
                self._flush_requests += 1
                self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    @property
    def backlog(self) -> int:
        """Records handed over and not written yet."""
        with self._cond:
            return self._appended - self._done

    def stats(self) -> StoreStats:
        """Files and bytes kept, files deleted by retention, records dropped, failed writes (for /metrics)."""
        with self._cond:
            return StoreStats(
                kept_items=self._kept_files,
                kept_bytes=self._kept_bytes,
                removed=dict(self._removed),
                dropped=dict(self._dropped),
                write_errors=dict(self._write_errors),
                backlog=self._appended - self._done,
            )

    def close(self) -> None:
        """Write everything appended so far, then close the file; later appends raise PredictionLogClosed."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


def _close_at_exit(ref: weakref.ref[PredictionLog]) -> None:
    log_ = ref()
    if log_ is not None:
        log_.close()


def read_log(directory: Path) -> list[dict[str, Any]]:
    """Every record of every log file, oldest file first."""
    records = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*.jsonl")):
        try:
            with open(path, encoding="utf-8") as fh:
                records.extend(json.loads(line) for line in fh if line.strip())
        except FileNotFoundError:
            continue  # deleted by retention meanwhile
    return records
