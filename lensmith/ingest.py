"""Ingest: data.source (ImageFolder, shard folder, CSV manifest or s3:// prefix) -> data/manifest.parquet + data/quarantine.csv.

Several sources are read together: data.source, data.sources, and the reviewed-data folder (data.reviewed_dir,
human corrections) when it exists; each row records its `source`. One file (sha256) under the same label in two
sources is one image: the row of the earlier source is kept (data.source first) and the copy is listed in
quarantine.csv as `copy_in_other_source` (not counted as a bad file). Under different labels both rows stay and
validation reports the label conflict.

Every candidate file is read once, hashed, fully decoded (lensmith.imageio) and described (lensmith.imagestats)
in a process pool. Files whose size+mtime (local), ETag (S3) or shard-index sha256 (shard members) match the
previous manifest are reused without being read. Unusable files are quarantined with a reason; the run fails
only when their share exceeds validate.max_bad_fraction, and then the previous manifest is left as it was.
The source is never written to.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import stat
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from lensmith.errors import DataError, ImageRejected
from lensmith.fsutil import write_csv_atomic, write_parquet_atomic
from lensmith.imageio import check_geometry, decode_image
from lensmith.imagestats import image_stats, perceptual_hash
from lensmith.labelslock import allowed_labels
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.procutil import pool_executor
from lensmith.schema import IMAGE_COLUMNS, MANIFEST_COLUMNS, MEMBER_COLUMNS
from lensmith.shards import ImageRef, read_image_bytes
from lensmith.sources import (
    Rejection,
    S3Settings,
    SourceItem,
    SourceListing,
    fetch_s3_object,
    file_column_value,
    list_sources,
    s3_errors,
    source_specs,
    s3_settings,
    sha256_hex,
)

QUARANTINE_COLUMNS: tuple[str, ...] = ("path", "reason", "detail")
MIN_ITEMS_FOR_POOL = 32  # below this, starting processes costs more than it saves
MAX_CHUNK = 64


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_file_bytes: int
    min_side: int
    max_aspect_ratio: float


@dataclass
class IngestSummary:
    source: str
    n_read: int
    n_reused: int
    n_quarantined: int
    per_class: dict[str, int]
    reasons: dict[str, int]
    seconds: float
    manifest: Path
    quarantine: Path
    n_copies: int = 0  # the same image (and label) in two sources: one row kept

    @property
    def n_images(self) -> int:
        return sum(self.per_class.values())

    @property
    def images_per_second(self) -> float:
        return (self.n_read + self.n_reused) / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        classes = ", ".join(f"{label} {count}" for label, count in sorted(self.per_class.items()))
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        lines = [
            f"ingest: {self.n_images} images from {self.source} in {self.seconds:.1f} s "
            f"({self.images_per_second:.0f} images/s)",
            f"  read {self.n_read}, reused {self.n_reused}, quarantined {self.n_quarantined}"
            + (f" ({reasons})" if reasons else "")
            + (f", {self.n_copies} copies across sources dropped" if self.n_copies else ""),
            f"  per class: {classes or 'none'}",
            f"  manifest: {self.manifest}",
            f"  quarantine: {self.quarantine}",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ one image (worker)


def describe_image(data: bytes, limits: DecodeLimits) -> dict[str, Any]:
    """Hash, decode and measure one image's bytes; raises ImageRejected when it is unusable."""
    decoded = decode_image(
        data, max_pixels=limits.max_pixels, min_side=limits.min_side, max_aspect_ratio=limits.max_aspect_ratio
    )
    img = decoded.image
    return {
        "sha256": sha256_hex(data),
        "file_bytes": len(data),
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "mode": img.mode,
        "source_mode": decoded.source_mode,
        "channels": len(img.getbands()),
        **image_stats(img),
        "phash": perceptual_hash(img),
    }


def read_item_bytes(item: SourceItem, limits: DecodeLimits, s3: S3Settings) -> bytes:
    if item.size > limits.max_file_bytes:
        raise ImageRejected("file_too_large", f"{item.size} bytes exceeds data.max_file_bytes={limits.max_file_bytes}")
    if item.is_s3:
        try:
            return fetch_s3_object(s3, item.bucket or "", item.key or "", item.local_file)
        except s3_errors() as exc:
            raise ImageRejected("s3_read_failed", f"{type(exc).__name__}: {exc}") from None
    if item.in_shard:
        return read_shard_member(item)
    try:
        return read_regular_file(item.local_file, limits.max_file_bytes)
    except FileNotFoundError:
        raise ImageRejected("missing_file", f"{item.local_file} disappeared during ingest") from None
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{item.local_file}: {exc}") from None


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked on the open file itself: a FIFO, device or
    socket swapped in after listing is refused without blocking, and a file that grew is not read past the limit."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageRejected("not_a_file", f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageRejected("file_too_large", f"{path} holds more than data.max_file_bytes={max_bytes} bytes")
    return data


def read_shard_member(item: SourceItem) -> bytes:
    """The member's bytes, checked against the shard index's sha256 (a damaged member is quarantined)."""
    ref = ImageRef(item.local_file, item.offset, item.size, item.path)
    try:
        return read_image_bytes(ref, sha256=item.sha256)
    except FileNotFoundError:
        raise ImageRejected("missing_shard", f"{item.local_file} disappeared during ingest") from None
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{ref}: {exc}") from None


def ingest_item(item: SourceItem, limits: DecodeLimits, s3: S3Settings) -> dict[str, Any] | Rejection:
    """The manifest columns for one item, or why it was rejected. Never raises for a bad file."""
    try:
        return describe_image(read_item_bytes(item, limits, s3), limits)
    except ImageRejected as exc:
        return Rejection(item.path, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 - one hostile file must not stop the run
        return Rejection(item.path, "decode_error", f"{type(exc).__name__}: {exc}")


def ingest_chunk(
    items: Sequence[SourceItem], limits: DecodeLimits, s3: S3Settings
) -> list[tuple[SourceItem, dict[str, Any] | Rejection]]:
    return [(item, ingest_item(item, limits, s3)) for item in items]


# ---------------------------------------------------------------------------------------- parallel map


def worker_count(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def chunked(items: Sequence[SourceItem], size: int) -> list[Sequence[SourceItem]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def pool_context() -> Any:
    # fork starts workers in milliseconds (spawn re-imports numpy/PIL/scipy per worker, ~1 s each).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def process_items(
    items: Sequence[SourceItem], limits: DecodeLimits, s3: S3Settings, workers: int
) -> list[tuple[SourceItem, dict[str, Any] | Rejection]]:
    """ingest_item over all items, in a process pool when it pays off, with a progress bar (ETA)."""
    results: list[tuple[SourceItem, dict[str, Any] | Rejection]] = []
    if not items:
        return results
    bar = tqdm(total=len(items), unit="img", desc="ingest", disable=None, mininterval=0.5, dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) < MIN_ITEMS_FOR_POOL:
            for item in items:
                results.append((item, ingest_item(item, limits, s3)))
                bar.update(1)
            return results
        size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (workers * 8))))
        try:
            with pool_executor(workers, pool_context()) as pool:  # threads inside a Dask worker
                futures = [pool.submit(ingest_chunk, chunk, limits, s3) for chunk in chunked(items, size)]
                for future in as_completed(futures):
                    done = future.result()
                    results.extend(done)
                    bar.update(len(done))
        except BrokenProcessPool as exc:
            raise DataError(
                f"an ingest worker process died ({exc}); a decoder crash or the memory limit; "
                "re-run with data.workers=1 to find the file"
            ) from None
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------------------------- reuse


def read_previous_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of the previous manifest by identity path; an unreadable or foreign file counts as none."""
    if not path.is_file():
        return {}
    try:
        frame = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a damaged previous manifest only costs a full re-read
        return {}
    # manifests written before shard support lack MEMBER_COLUMNS (their rows are plain files), before several
    # sources lack `source`
    if not set(MANIFEST_COLUMNS).difference(MEMBER_COLUMNS, ["source"]).issubset(frame.columns):
        return {}
    return {str(row["path"]): row for row in frame.reindex(columns=list(MANIFEST_COLUMNS)).to_dict("records")}


def is_unchanged(item: SourceItem, previous: dict[str, Any]) -> bool:
    if item.sha256 is not None:
        return previous.get("sha256") == item.sha256 and previous.get("file_bytes") == item.size
    if item.is_s3:
        return bool(item.etag) and previous.get("etag") == item.etag
    return (
        previous.get("file_bytes") == item.size
        and previous.get("mtime_ns") is not None
        and not pd.isna(previous["mtime_ns"])
        and int(previous["mtime_ns"]) == item.mtime_ns
    )


def reused_result(previous: dict[str, Any], limits: DecodeLimits) -> dict[str, Any] | Rejection:
    """The previous row's image columns, re-checked against the current size limits."""
    try:
        if int(previous["file_bytes"]) > limits.max_file_bytes:
            raise ImageRejected(
                "file_too_large", f"{previous['file_bytes']} bytes exceeds data.max_file_bytes={limits.max_file_bytes}"
            )
        check_geometry(
            int(previous["width"]),
            int(previous["height"]),
            max_pixels=limits.max_pixels,
            min_side=limits.min_side,
            max_aspect_ratio=limits.max_aspect_ratio,
        )
    except ImageRejected as exc:
        return Rejection(str(previous["path"]), exc.reason, exc.detail)
    return {column: previous[column] for column in IMAGE_COLUMNS}


# -------------------------------------------------------------------------------------------- labels


def expected_labels(params: Params, layout: Layout) -> tuple[set[str] | None, str]:
    """The allowed label set and where it came from: params validate.labels, else the pinned labels.lock.json."""
    if params.validate.labels:
        return set(params.validate.labels), "params validate.labels"
    allowed = allowed_labels(layout.labels_lock)
    return (None, "") if allowed is None else (allowed, str(layout.labels_lock))


def split_unknown_labels(
    items: Iterable[SourceItem], allowed: set[str] | None, origin: str
) -> tuple[list[SourceItem], list[Rejection]]:
    if allowed is None:
        return list(items), []
    known, unknown = [], []
    shown = ", ".join(sorted(allowed))
    for item in items:
        if item.label in allowed:
            known.append(item)
        else:
            unknown.append(Rejection(item.path, "unknown_label", f"label {item.label!r} is not one of [{shown}] ({origin})"))
    return known, unknown


# ----------------------------------------------------------------------------------------- assembling


def manifest_row(item: SourceItem, image_columns: dict[str, Any], layout: Layout) -> dict[str, Any]:
    return {
        "path": item.path,
        "file": file_column_value(item.local_file, layout),
        "label": item.label,
        **image_columns,
        "mtime_ns": item.mtime_ns,
        "etag": item.etag,
        "member_offset": item.offset,
        "member_size": item.size if item.in_shard else None,
        "source": item.source,
    }


def drop_copies_across_sources(rows: list[dict[str, Any]], sources: list[str]) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Rows without the copies of one file (sha256) under the same label found in another source: the row of the
    earliest source in `sources` stays. Copies inside one source are left to validation (sha256_unique)."""
    rank = {spec: i for i, spec in enumerate(sources)}
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (rank.get(r["source"], len(rank)), r["path"])):
        first.setdefault((str(row["sha256"]), str(row["label"])), row)
    survivors, copies = [], []
    for row in rows:
        kept = first[(str(row["sha256"]), str(row["label"]))]
        if row["source"] == kept["source"]:
            survivors.append(row)
        else:
            detail = f"the same image, label {row['label']!r}, as {kept['path']} in {kept['source']}; that row is kept"
            copies.append(Rejection(row["path"], "copy_in_other_source", detail))
    return survivors, copies


def manifest_frame(rows: list[dict[str, Any]], metadata: pd.DataFrame | None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame = frame.astype(
        {
            "file_bytes": "int64", "width": "int64", "height": "int64", "channels": "int64", "mtime_ns": "Int64",
            **dict.fromkeys(MEMBER_COLUMNS, "Int64"),
        }
    )
    frame["etag"] = frame["etag"].astype("string")
    if metadata is not None and len(metadata.columns):
        clash = sorted(set(metadata.columns) & set(MANIFEST_COLUMNS))
        if clash:
            raise DataError(f"metadata columns {clash} clash with manifest columns; rename them in the metadata CSV")
        frame = frame.join(metadata, on="path")
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def quarantine_frame(rejections: list[Rejection]) -> pd.DataFrame:
    frame = pd.DataFrame([(r.path, r.reason, r.detail) for r in rejections], columns=list(QUARANTINE_COLUMNS))
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def check_bad_fraction(
    n_accepted: int, rejections: list[Rejection], max_bad_fraction: float, source: str, report: Path
) -> None:
    total = n_accepted + len(rejections)
    if total == 0:
        raise DataError(f"no images found in {source} (data.image_extensions decides which files count)")
    share = len(rejections) / total
    top = ", ".join(f"{reason} {count}" for reason, count in Counter(r.reason for r in rejections).most_common(3))
    if n_accepted == 0:
        raise DataError(f"none of the {total} files in {source} is usable; top reasons: {top}; see {report}")
    if share > max_bad_fraction:
        raise DataError(
            f"{len(rejections)} of {total} files ({share:.1%}) were quarantined, above "
            f"validate.max_bad_fraction={max_bad_fraction:.1%}; top reasons: {top}; see {report}; "
            "the previous manifest was left unchanged"
        )


def decode_limits(params: Params) -> DecodeLimits:
    data = params.data
    return DecodeLimits(
        max_pixels=data.max_pixels,
        max_file_bytes=data.max_file_bytes,
        min_side=data.min_side,
        max_aspect_ratio=data.max_aspect_ratio,
    )


def run_ingest(params: Params, layout: Layout) -> IngestSummary:
    """Build data/manifest.parquet (one row per accepted image, sorted by path) and data/quarantine.csv.

    When the source cannot be used (missing, unreachable, empty, too many bad files) the data gate's reports
    are written too, with the problem and its fix, so a run that stops here still leaves reports/validation.*."""
    try:
        return build_manifest(params, layout)
    except DataError as exc:
        record_failure_in_validation_report(layout, exc)
        raise


def record_failure_in_validation_report(layout: Layout, error: DataError) -> None:
    from lensmith.errors import SourceUnavailableError
    from lensmith.validation.report import precondition_failure, write_precondition_report

    if isinstance(error, SourceUnavailableError):
        name, fix = "source_readable", "check data.source (path, CSV or s3:// prefix), data.s3_endpoint_url and credentials"
    else:
        name, fix = "source_usable", (
            "put images in <class>/<file> folders under data.source (file types: data.image_extensions); "
            f"rejected files are listed with their reason in {layout.quarantine.name}"
        )
    check = precondition_failure(name, str(error), fix)
    write_precondition_report(layout.validation_json, layout.validation_html, check)


def build_manifest(params: Params, layout: Layout) -> IngestSummary:
    started = time.perf_counter()
    listing: SourceListing = list_sources(params.data, layout)
    allowed, origin = expected_labels(params, layout)
    items, rejections = split_unknown_labels(listing.items, allowed, origin)
    rejections = listing.rejections + rejections
    limits = decode_limits(params)

    previous = read_previous_manifest(layout.manifest)
    outcomes: list[tuple[SourceItem, dict[str, Any] | Rejection]] = []
    to_read: list[SourceItem] = []
    for item in items:
        old = previous.get(item.path)
        if old is not None and is_unchanged(item, old):
            outcomes.append((item, reused_result(old, limits)))
        else:
            to_read.append(item)
    n_reused = len(outcomes)
    outcomes += process_items(to_read, limits, s3_settings(params.data), worker_count(params.data.workers))

    rows = []
    for item, result in outcomes:
        if isinstance(result, Rejection):
            rejections.append(result)
        else:
            rows.append(manifest_row(item, result, layout))
    rows, copies = drop_copies_across_sources(rows, source_specs(params.data, layout))

    write_csv_atomic(layout.quarantine, quarantine_frame(rejections + copies))
    check_bad_fraction(
        len(rows), rejections, params.validate.max_bad_fraction, listing.description, layout.quarantine
    )
    manifest = manifest_frame(rows, listing.metadata)
    write_parquet_atomic(layout.manifest, manifest)
    return IngestSummary(
        source=listing.description,
        n_read=len(to_read),
        n_reused=n_reused,
        n_quarantined=len(rejections),
        per_class={str(k): int(v) for k, v in manifest["label"].value_counts().sort_index().items()},
        reasons=dict(Counter(r.reason for r in rejections)),
        seconds=time.perf_counter() - started,
        manifest=layout.manifest,
        quarantine=layout.quarantine,
        n_copies=len(copies),
    )
