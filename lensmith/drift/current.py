"""The current window that drift is measured on: an image folder, an s3:// prefix, or the service's
prediction log over the last `--since` (e.g. 7d).

Images are listed with lensmith.sources (the same safe listing as ingest: <class>/<file> gives a label,
files at the root are unlabelled), read with ingest's reader (local or S3 mirror), decoded with
lensmith.imageio and measured with lensmith.imagestats. Files that fail are quarantined with a reason,
counted, and never stop the run. Decoding runs in a process pool and yields chunks, so the caller can
compute embeddings on one chunk while the workers decode the next.

`--where site=C` (`WindowFilter`) cuts the window before it is sampled or decoded: prediction-log records by the
context the service logged with them, folder images by their metadata.csv column. An unknown column, or nothing
left after the cut, is a `WindowFilterError` naming the filter and the counts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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
LOG_COLUMNS: tuple[str, ...] = ("path", *STAT_COLUMNS, "predicted_label", "confidence", "model_version", "time")
NOT_CONTEXT = frozenset((*LOG_COLUMNS, "label"))  # a log window's own columns: a context column never replaces one
LOG_SOURCE = "log"
LOG_PREFIX = "predictions-"  # lensmith.serve.predlog's file names
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
CHUNK = 128


# ---- the --where filter -------------------------------------------------------------------------------


class WindowFilterError(DataError):
    """A --where filter that names an unknown column, or leaves nothing of the window."""


@dataclass(frozen=True)
class WindowFilter:
    """`column=v1,v2`: the images whose `column` is one of `values`."""

    column: str
    values: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.column}={','.join(self.values)}"


def parse_where(texts: Sequence[str]) -> list[WindowFilter]:
    """`["site=C,D", "line=3"]` -> filters that must all hold (one per column)."""
    filters: dict[str, WindowFilter] = {}
    for text in texts:
        column, equals, values = text.partition("=")
        column, wanted = column.strip(), tuple(v.strip() for v in values.split(","))
        if not equals or not column or not all(wanted):
            raise DataError(f"--where {text!r} is not a filter like site=C or site=C,D (column=value[,value...])")
        if column in filters:
            raise DataError(f"--where names {column!r} twice: give its values once, comma-separated ({column}=A,B)")
        filters[column] = WindowFilter(column, wanted)
    return list(filters.values())


def where_text(filters: Sequence[WindowFilter]) -> str:
    return " ".join(str(f) for f in filters)


def cell_text(value: Any) -> str | None:
    """A metadata or context value as the filter compares it: text (3.0 read from a CSV as 3), None when missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def matching_positions(rows: Sequence[Mapping[str, Any]], filters: Sequence[WindowFilter], known: Sequence[str], what: str) -> list[int]:
    """Positions of the `rows` (column -> value) that every filter matches; WindowFilterError for a column not
    in `known` (what the window's `what` carry) or when none match."""
    for f in filters:
        if f.column not in known:
            shown = f"the columns {sorted(known)}" if known else "no columns"
            raise WindowFilterError(f"--where {f}: unknown column {f.column!r}; the window's {what} carry {shown}")
    texts = [{f.column: cell_text(row.get(f.column)) for f in filters} for row in rows]
    kept = [i for i, row in enumerate(texts) if all(row[f.column] in f.values for f in filters)]
    if not kept:
        seen = {f.column: dict(Counter(str(row[f.column]) for row in texts).most_common(10)) for f in filters}
        raise WindowFilterError(f"empty window after --where {where_text(filters)}: none of its {len(rows)} images match (values seen: {seen})")
    return kept


def where_note(filters: Sequence[WindowFilter], kept: int, total: int) -> list[str]:
    return [f"the window is cut by --where {where_text(filters)}: {kept} of {total} images"] if filters else []


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
    where: list[str] = field(default_factory=list)  # the --where filters that cut it (`WindowFilter` as text)
    n_before_where: int | None = None  # images before those filters; None = not filtered

    @property
    def n_images(self) -> int:
        return len(self.frame)

    @property
    def has_labels(self) -> bool:
        return "label" in self.frame.columns and self.frame["label"].notna().any()


def record_context(record: dict[str, Any]) -> dict[str, Any]:
    """The context the service logged with a prediction (column -> value); {} for none or older records."""
    context = record.get("context")
    return context if isinstance(context, dict) else {}


def records_where(records: list[dict[str, Any]], filters: Sequence[WindowFilter]) -> list[dict[str, Any]]:
    """The records whose logged context every filter matches (all of them without filters or records)."""
    if not filters or not records:
        return records
    contexts = [record_context(r) for r in records]
    known = sorted({str(column) for context in contexts for column in context})
    return [records[i] for i in matching_positions(contexts, filters, known, "prediction-log records' context")]


def load_log_window(
    directory: Path, since: str, now: datetime | None = None, max_images: int | None = None, seed: int = 0,
    where: Sequence[WindowFilter] = (),
) -> CurrentWindow:
    """The prediction log's records in the last `since` whose context matches `where`: stats, predicted label,
    confidence and context columns per image (a seeded sample of `max_images` records when there are more)."""
    if not Path(directory).is_dir():
        raise DataError(f"prediction log folder {directory} does not exist; is the service logging (serve.log_dir)?")
    cutoff = (now or datetime.now(timezone.utc)) - parse_duration(since)
    read = read_log_records(Path(directory), cutoff)
    records = records_where(read.records, where)
    n = len(records)
    limit = n if max_images is None else max_images
    rows = [log_row(records[i]) for i in sampled_positions(n, limit, seed)]
    frame = pd.DataFrame(rows, columns=[*LOG_COLUMNS, *sorted({c for row in rows for c in row} - NOT_CONTEXT)])
    notes = [
        "the prediction log holds no pixels: embedding drift is not measured for log windows",
        *where_note(where, n, len(read.records)), *sampling_note(n, limit),
    ]
    if read.unreadable_lines:
        notes.append(f"{read.unreadable_lines} unreadable log line(s) skipped")
    versions = sorted(frame["model_version"].dropna().astype(str).unique())
    if len(versions) > 1:
        notes.append(f"the window mixes model versions {versions}: prediction drift compares them together")
    description = f"prediction log {directory} since {cutoff.isoformat(timespec='seconds')} ({since})"
    if where:
        description += f" where {where_text(where)}"
    return CurrentWindow(
        description, "log", frame, notes=notes, n_in_window=n,
        where=[str(f) for f in where], n_before_where=len(read.records) if where else None,
    )


def log_row(record: dict[str, Any]) -> dict[str, Any]:
    """One record as a window row, with its context columns (but none named like a window's own column)."""
    row = {c: pd.to_numeric(record.get(c), errors="coerce") for c in STAT_COLUMNS}
    row.update(
        path=record.get("image_sha256") or record.get("id"),
        predicted_label=None if record.get("label") is None else str(record["label"]),
        confidence=pd.to_numeric(record.get("confidence"), errors="coerce"),
        model_version=record.get("model_version"),
        time=record.get("time"),
    )
    row.update({str(k): cell_text(v) for k, v in record_context(record).items() if str(k) not in NOT_CONTEXT})
    return row


def list_window(source: str, params: Params, layout: Layout) -> SourceListing:
    """Images under `source` via the ingest listing and its checks; images at the root are kept, unlabelled."""
    return list_source(params.data.model_copy(update={"source": source}), layout, root_label="")


def items_where(listing: SourceListing, filters: Sequence[WindowFilter]) -> list[SourceItem]:
    """The listed images whose metadata.csv row every filter matches (all of them without filters)."""
    if not filters or not listing.items:
        return listing.items
    metadata = listing.metadata
    if metadata is None:
        raise WindowFilterError(
            f"--where {where_text(filters)}: {listing.description} has no metadata.csv (or manifest metadata columns), "
            "so its images carry no columns to filter on"
        )
    unique = metadata[~metadata.index.duplicated(keep="first")]  # a manifest may list a path twice
    rows = unique.reindex([item.path for item in listing.items]).to_dict("records")
    kept = matching_positions(rows, filters, [str(c) for c in metadata.columns], "metadata.csv rows")
    return [listing.items[i] for i in kept]


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
