"""The current window that drift is measured on: an image folder, an s3:// prefix, or the service's
prediction log over the last `--since` (e.g. 7d).

Images are listed with lensmith.sources (the same safe listing as ingest: <class>/<file> gives a label,
files at the root are unlabelled), read with ingest's reader (local or S3 mirror), decoded with
lensmith.imageio and measured with lensmith.imagestats. Files that fail are quarantined with a reason,
counted, and never stop the run. Decoding runs in a process pool and yields chunks, so the caller can
compute embeddings on one chunk while the workers decode the next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensmith.errors import DataError, ImageRejected
from lensmith.imageio import decode_image
from lensmith.imagestats import image_stats
from lensmith.schema import IMAGE_STAT_COLUMNS
from lensmith.ingest import DecodeLimits, chunked, decode_limits, pool_context, read_item_bytes, worker_count
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.preprocess import Preprocessing
from lensmith.sources import (
    Rejection,
    S3Settings,
    SourceItem,
    SourceListing,
    is_s3_uri,
    list_source,
    local_source_path,
    s3_settings,
)

STAT_COLUMNS: tuple[str, ...] = (*IMAGE_STAT_COLUMNS, "width", "height")
LOG_SOURCE = "log"
LOG_PREFIX = "predictions-"  # lensmith.serve.predlog's file names
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
CHUNK = 128


# ---- durations and the prediction log ------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """'30m', '12h', '7d', '2w' -> timedelta."""
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise DataError(f"--since {text!r} is not a duration like 30m, 12h, 7d or 2w")
    return timedelta(**{DURATION_UNITS[match.group(2)]: int(match.group(1))})


def parse_log_time(value: Any) -> datetime | None:
    """The log's UTC timestamps ('2024-05-01T10:00:00.123Z'); None when unreadable."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return None


def log_directory(source: str, params: Params, layout: Layout) -> Path | None:
    """The prediction-log folder `source` names ('log' = serve.log_dir), or None when it is not a log."""
    if source == LOG_SOURCE:
        return layout.root / params.serve.log_dir
    if is_s3_uri(source):
        return None
    path = local_source_path(source, layout)
    return path if path.is_dir() and any(path.glob(f"{LOG_PREFIX}*.jsonl")) else None


@dataclass
class LogRead:
    records: list[dict[str, Any]]
    unreadable_lines: int
    files: int


def read_log_records(directory: Path, since: datetime) -> LogRead:
    """Records at or after `since` from every log file; a half-written or corrupt line is counted, not fatal.
    A file the service's retention deletes while this reads is skipped."""
    records, bad, files = [], 0, 0
    for path in sorted(Path(directory).glob(f"{LOG_PREFIX}*.jsonl")):
        try:
            fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue
        files += 1
        with fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                when = parse_log_time(record.get("time")) if isinstance(record, dict) else None
                if when is None:
                    bad += 1
                elif when >= since:
                    records.append(record)
    return LogRead(records, bad, files)


# ---- the window ---------------------------------------------------------------------------------------


def sampled_positions(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded uniform sample of at most `limit` out of `n` (all when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def sampling_note(n: int, limit: int) -> list[str]:
    if n <= limit:
        return []
    return [f"the window holds {n} images: drift is measured on a seeded random sample of {limit} (drift.max_window_images)"]


@dataclass
class CurrentWindow:
    """Per-image rows of the window (stats, label when known; predictions for log windows)."""

    description: str
    kind: str  # "images" or "log"
    frame: pd.DataFrame
    rejections: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_in_window: int | None = None  # before sampling; None = not sampled

    @property
    def n_images(self) -> int:
        return len(self.frame)

    @property
    def has_labels(self) -> bool:
        return "label" in self.frame.columns and self.frame["label"].notna().any()


def load_log_window(
    directory: Path, since: str, now: datetime | None = None, max_images: int | None = None, seed: int = 0
) -> CurrentWindow:
    """The prediction log's records in the last `since`: stats, predicted label and confidence per image
    (a seeded sample of `max_images` records when there are more)."""
    if not Path(directory).is_dir():
        raise DataError(f"prediction log folder {directory} does not exist; is the service logging (serve.log_dir)?")
    cutoff = (now or datetime.now(timezone.utc)) - parse_duration(since)
    read = read_log_records(Path(directory), cutoff)
    n = len(read.records)
    limit = n if max_images is None else max_images
    rows = [log_row(read.records[i]) for i in sampled_positions(n, limit, seed)]
    frame = pd.DataFrame(rows, columns=["path", *STAT_COLUMNS, "predicted_label", "confidence", "model_version", "time"])
    notes = ["the prediction log holds no pixels: embedding drift is not measured for log windows", *sampling_note(n, limit)]
    if read.unreadable_lines:
        notes.append(f"{read.unreadable_lines} unreadable log line(s) skipped")
    versions = sorted(frame["model_version"].dropna().astype(str).unique())
    if len(versions) > 1:
        notes.append(f"the window mixes model versions {versions}: prediction drift compares them together")
    description = f"prediction log {directory} since {cutoff.isoformat(timespec='seconds')} ({since})"
    return CurrentWindow(description, "log", frame, notes=notes, n_in_window=n)


def log_row(record: dict[str, Any]) -> dict[str, Any]:
    row = {c: pd.to_numeric(record.get(c), errors="coerce") for c in STAT_COLUMNS}
    row.update(
        path=record.get("image_sha256") or record.get("id"),
        predicted_label=None if record.get("label") is None else str(record["label"]),
        confidence=pd.to_numeric(record.get("confidence"), errors="coerce"),
        model_version=record.get("model_version"),
        time=record.get("time"),
    )
    return row


def list_window(source: str, params: Params, layout: Layout) -> SourceListing:
    """Images under `source` via the ingest listing and its checks; images at the root are kept, unlabelled."""
    return list_source(params.data.model_copy(update={"source": source}), layout, root_label="")


@dataclass
class DecodedChunk:
    rows: list[dict[str, Any]]  # path, label, stats
    images: np.ndarray  # N x C x H x W uint8 at the model's input size
    rejections: list[Rejection]


def describe_item(item: SourceItem, limits: DecodeLimits, s3: S3Settings, preprocessing: Preprocessing) -> tuple[dict[str, Any], np.ndarray] | Rejection:
    """Stats row and model-input pixels of one image, or why it was rejected. Never raises for a bad file."""
    try:
        decoded = decode_image(
            read_item_bytes(item, limits, s3),
            max_pixels=limits.max_pixels,
            min_side=limits.min_side,
            max_aspect_ratio=limits.max_aspect_ratio,
        )
        img = decoded.image
        row = {"path": item.path, "label": item.label or None, **image_stats(img), "width": img.width, "height": img.height}
        return row, preprocessing.to_uint8(img).transpose(2, 0, 1)
    except ImageRejected as exc:
        return Rejection(item.path, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one hostile file must not stop monitoring
        return Rejection(item.path, "decode_error", f"{type(exc).__name__}: {exc}")


def decode_chunk(items: Sequence[SourceItem], limits: DecodeLimits, s3: S3Settings, preprocessing: Preprocessing) -> DecodedChunk:
    rows, images, rejections = [], [], []
    for item in items:
        outcome = describe_item(item, limits, s3, preprocessing)
        if isinstance(outcome, Rejection):
            rejections.append(outcome)
        else:
            rows.append(outcome[0])
            images.append(outcome[1])
    size = preprocessing.image_size
    stacked = np.stack(images) if images else np.zeros((0, preprocessing.num_channels, size, size), np.uint8)
    return DecodedChunk(rows, stacked, rejections)


def decoded_chunks(
    items: Sequence[SourceItem], params: Params, preprocessing: Preprocessing, workers: int | None = None
) -> Iterator[DecodedChunk]:
    """decode_chunk over `items` in order, in a process pool when there is enough to share."""
    limits, s3 = decode_limits(params), s3_settings(params.data)
    workers = worker_count(params.data.workers if workers is None else workers)
    chunks = chunked(items, CHUNK)
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            yield decode_chunk(chunk, limits, s3, preprocessing)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
        # keep only a few chunks in flight: decoded pixels are large, embeddings are small
        pending = [pool.submit(decode_chunk, c, limits, s3, preprocessing) for c in chunks[: workers * 2]]
        for chunk in chunks[workers * 2 :]:
            done = pending.pop(0).result()
            pending.append(pool.submit(decode_chunk, chunk, limits, s3, preprocessing))
            yield done
        for future in pending:
            yield future.result()
