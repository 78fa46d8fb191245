"""The prediction log: append-only JSON lines in size-rotated files (never rewritten, never truncated).

Files are named predictions-<UTC start time>-<pid>-<n>.jsonl, so several server processes and restarts
never write into each other's files; drift monitoring reads them all in name order.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

PREFIX = "predictions-"


class PredictionLog:
    def __init__(self, directory: Path, rotate_bytes: int) -> None:
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._handle: Any = None
        self._written = 0
        self._count = 0

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
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

    def append(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records)
        with self._lock:
            if self._handle is None or self._written >= self.rotate_bytes:
                self._open_next()
            self._handle.write(lines)
            self._handle.flush()
            self._written += len(lines.encode())

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


def read_log(directory: Path) -> list[dict[str, Any]]:
    """Every record of every log file, oldest file first."""
    records = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return records
