"""The review queue (the flywheel's inbox) and `lensmith review export|import`.

On disk, under serve.review_dir:
  images/<sha256>.<ext>   each queued image once, content-addressed, never overwritten
  queue.jsonl             one appended line per item (low confidence or feedback); only retention rewrites it
  imports/<stamp>.json    what each `review import` did
  .lock                   fcntl lock held by every add and retention pass (several server processes may share the queue)

Retention (serve.review_max_age_days, serve.review_max_bytes; 0 = no limit): items older than the age limit
are removed, then the oldest items until the queue (queue.jsonl + the images still referenced) fits in the
size limit; an image goes when no remaining item references it. A size-triggered pass frees down to
PRUNE_TO of the limit so it does not rerun on every add. Never removed: feedback items carrying a human label
(`feedback_label` a class, not "wrong") until a `review import` took their image in (imports/*.json); they
count toward the size, so a queue full of them stops keeping low-confidence items. Items exported for
labelling may be removed before their labels come back: run export -> label -> import more often than
review_max_age_days; an import reports such items as `image_pruned` conflicts. Retention runs inside `add`
(in the service's thread pool) on the first add, at most once a minute after that, and whenever the queue
has grown past the size limit.

The service queues its own low-confidence items with `offer`: an item that cannot be stored (disk full,
permissions) is dropped, counted (`stats()`, /metrics) and logged at most once a minute, and the prediction
is answered anyway. `add` (feedback) raises the OSError.

`export_queue` writes the queue as review.csv (fill in `corrected_label`; the request context in `context.<column>`
columns) plus a Label Studio import (labelstudio_tasks.json: image URL, ids and context in `data`, the model's
prediction pre-filled under the tag names of labelstudio_config.xml). `import_corrections` reads that CSV or a Label
Studio JSON export (the latest non-cancelled annotation of each task wins) and writes each corrected image into the
reviewed-data folder (data.reviewed_dir, lensmith.reviewed): `<reviewed_dir>/<label>/<sha256>.<ext>` plus a
metadata.csv row (request context + provenance), all or nothing. Corrections are a source of their own: never
written into data.source or a stage's output. It never overwrites and reports every conflict instead of guessing:
an image already in the data under another label (any source, the reviewed folder included), the same image
corrected to two labels, an unknown label, an image retention removed.

A corrected label becomes a folder name, so it must be one safe path segment (`label_problem`): no `/`
or `\\`, no `..`, no leading dot, no NUL or other control characters, not empty, at most
MAX_LABEL_CHARS characters; and the file it leads to must resolve inside the reviewed folder (a symlinked
label folder pointing elsewhere is refused too). A bad label stops the import before anything is
written, naming the row (CSV line or Label Studio task) it came from; `--allow-new-labels` only skips
the check against the known classes, never this one.
"""

from __future__ import annotations

import calendar
import csv
import errno
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from lensmith.errors import DataError
from lensmith.fsutil import atomic_path, write_json_atomic, write_text_atomic
from lensmith.jsondoc import read_json_or_none
from lensmith.schema import MANIFEST_COLUMNS, REVIEW_COLUMNS, SPLIT_ADDED_COLUMNS
from lensmith.reviewed import append_metadata_rows, ensure_reviewed_folder, labels_in_folder
from lensmith.serve.storage import RateLimitedLog, Retention, StoreStats

log = logging.getLogger("lensmith.serve")

QUEUE_FILE = "queue.jsonl"
IMAGES_DIR = "images"
IMPORTS_DIR = "imports"
LOCK_FILE = ".lock"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
PRUNE_INTERVAL_S = 60.0  # retention passes between size-triggered ones
PRUNE_TO = 0.9  # a size-triggered pass frees down to this share of review_max_bytes
FIND_MAX_BYTES = 8 * 1024 * 1024  # of queue.jsonl searched for a prediction's item (~25k items): a 404 stays cheap
CSV_COLUMNS = (
    "item_id",
    "image",
    "image_sha256",
    "reason",
    "predicted_label",
    "confidence",
    "feedback_label",
    "model_version",
    "time",
    "corrected_label",
)


MAX_LABEL_CHARS = 128
MAX_NAME_BYTES = 255  # a file name's limit on common filesystems


def label_problem(label: str) -> str | None:
    """Why `label` cannot be used as one folder name under the data source, or None when it can."""
    if not label:
        return "it is empty"
    if label != label.strip():
        return "it starts or ends with whitespace"
    if len(label) > MAX_LABEL_CHARS or len(label.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_LABEL_CHARS} characters"
    if "/" in label or "\\" in label:
        return "it contains a path separator (/ or \\)"
    if ".." in label:
        return "it contains '..'"
    if label.startswith("."):
        return "it starts with a dot"
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        return "it contains a control character (NUL, newline, tab, ...)"
    return None


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with symlinks and `..` resolved, lies inside `folder` (resolved too)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def write_new_file(target: Path, data: bytes) -> bool:
    """Write `data` to `target` only if nothing is there (complete file or none; False when it existed)."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.link(tmp_name, target)  # unlike rename, link refuses to replace an existing file
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_name)


def append_line(path: Path, line: str) -> None:
    """Append one line; a failed (or short) write is cut back off, so the file never ends in half a line."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", str(path))
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def new_item(
    sha256: str, ext: str, reason: str, prediction: dict[str, Any], feedback_label: str | None, context: dict[str, str] | None = None
) -> dict[str, Any]:
    """One queue.jsonl item. `context`: the image's context as the predict request sent it (column -> value:
    site, line, camera...; lensmith.serve.context), None when it sent none; items from before context have no key."""
    return {
        "item_id": uuid.uuid4().hex,
        "time": time.strftime(TIME_FORMAT, time.gmtime()),
        "reason": reason,
        "image": f"{IMAGES_DIR}/{sha256}.{ext}",
        "image_sha256": sha256,
        "prediction_id": prediction.get("id"),
        "predicted_label": prediction.get("label"),
        "confidence": prediction.get("confidence"),
        "model_version": prediction.get("model_version"),
        "feedback_label": feedback_label,
        "context": context,
    }


class ReviewQueue:
    def __init__(self, directory: Path, retention: Retention = Retention()) -> None:
        self.directory = Path(directory)
        self.retention = retention
        self._lock = threading.Lock()  # this process's adds and retention passes (.lock orders processes)
        self._next_prune = 0.0  # monotonic time of the next periodic retention pass
        self._estimated_bytes: int | None = None  # queue size measured by the last pass plus adds since; None: not measured
        self._stats_lock = threading.Lock()
        self._kept_items = 0
        self._kept_bytes = 0
        self._removed = {"age": 0, "size": 0, "invalid": 0}
        self._dropped = {"write_error": 0}
        self._write_errors: dict[str, int] = {}
        self._warnings = RateLimitedLog(log)

    def image_path(self, sha256: str, ext: str) -> Path:
        return self.directory / IMAGES_DIR / f"{sha256}.{ext}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / LOCK_FILE, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def add(
        self, *, image: bytes, sha256: str, ext: str, reason: str, prediction: dict[str, Any], feedback_label: str | None = None,
        context: dict[str, str] | None = None,
    ) -> str:
        """Queue one image (with its `context`, see `new_item`); returns the new item id. Raises OSError when it
        cannot be stored (disk full, ...)."""
        item = new_item(sha256, ext, reason, prediction, feedback_label, context)
        line = json.dumps(item, separators=(",", ":")) + "\n"
        with self._locked():
            image_path = self.image_path(sha256, ext)
            image_written = write_new_file(image_path, image)
            try:
                append_line(self.directory / QUEUE_FILE, line)
            except OSError:
                if image_written:  # no item refers to it: retention would never remove it
                    image_path.unlink(missing_ok=True)
                raise
            self._grew(len(line.encode()) + (len(image) if image_written else 0))
            if self._prune_due():
                self._prune_quietly(time.time())
        return item["item_id"]

    def offer(
        self, *, image: bytes, sha256: str, ext: str, reason: str, prediction: dict[str, Any], feedback_label: str | None = None,
        context: dict[str, str] | None = None,
    ) -> str | None:
        """`add`, for items nobody waits for (low confidence): the item id, or None when it could not be stored;
        the failure is counted and logged at most once a minute, never raised."""
        try:
            return self.add(
                image=image, sha256=sha256, ext=ext, reason=reason, prediction=prediction, feedback_label=feedback_label, context=context
            )
        except OSError as exc:
            with self._stats_lock:
                self._dropped["write_error"] += 1
            self._count_write_error(exc)
            self._warnings.log(
                logging.WARNING, "review queue: could not store an item in %s (%s); item dropped, the prediction is answered",
                self.directory, exc,
            )
            return None

    def prune(self, now: float | None = None) -> dict[str, int]:
        """Apply retention now; the number of items removed per reason (age, size, invalid)."""
        with self._locked():
            return self._prune(time.time() if now is None else now)

    def stats(self) -> StoreStats:
        """Items and bytes kept (as of the last retention pass, plus adds since), removals, drops, failed writes."""
        with self._stats_lock:
            return StoreStats(
                self._kept_items, self._kept_bytes, dict(self._removed), dict(self._dropped), dict(self._write_errors)
            )

    # ---- retention (called with the locks held) ---------------------------------------------------------

    def _grew(self, size: int) -> None:
        with self._stats_lock:
            self._kept_items += 1
            self._kept_bytes += size
        if self._estimated_bytes is not None:
            self._estimated_bytes += size

    def _prune_due(self) -> bool:
        if self._estimated_bytes is None or time.monotonic() >= self._next_prune:
            return True
        return self.retention.too_big(self._estimated_bytes)

    def _prune_quietly(self, now: float) -> None:
        """A retention pass inside `add`: the item is stored already, so a failed pass is logged, not raised."""
        try:
            self._prune(now)
        except OSError as exc:
            self._count_write_error(exc)
            self._warnings.log(logging.WARNING, "review queue: retention in %s failed (%s); retried later", self.directory, exc)

    def _prune(self, now: float) -> dict[str, int]:
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        entries = read_entries(self.directory)
        plan = plan_pruning(entries, self.retention, now)
        if plan:
            self._remove(entries, plan)
        removed = Counter(plan.values())
        kept_size = kept_bytes(entries, plan)
        self._estimated_bytes = kept_size
        with self._stats_lock:
            self._kept_items = len(entries) - len(plan)
            self._kept_bytes = kept_size
            for reason, n in removed.items():
                self._removed[reason] = self._removed.get(reason, 0) + n
        return dict(removed)

    def _remove(self, entries: list[QueueEntry], plan: dict[int, str]) -> None:
        """Delete the images only removed entries use, then rewrite queue.jsonl without those entries (images
        first: on a full disk that frees the room the rewrite needs)."""
        kept = [e for i, e in enumerate(entries) if i not in plan]
        in_use = {e.image for e in kept}
        images = self.directory / IMAGES_DIR
        for image in sorted({entries[i].image for i in plan if entries[i].image} - in_use):
            path = self.directory / image
            if inside(path, images):
                path.unlink(missing_ok=True)
        write_text_atomic(self.directory / QUEUE_FILE, "".join(e.line for e in kept))

    def _count_write_error(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "other")
        with self._stats_lock:
            self._write_errors[name] = self._write_errors.get(name, 0) + 1


@dataclass(frozen=True)
class QueueEntry:
    """One line of queue.jsonl as retention sees it."""

    line: str  # with its newline
    item: dict[str, Any] | None  # None: not a queue item (a line cut short by a crash)
    image_bytes: int = 0  # its image file's size (0: missing)
    protected: bool = False  # never removed by retention

    @property
    def image(self) -> str | None:
        return str(self.item["image"]) if self.item else None

    @property
    def created(self) -> float | None:
        """The item's time as a Unix timestamp (None when unreadable: then it never ages out)."""
        try:
            return float(calendar.timegm(time.strptime(str(self.item["time"]), TIME_FORMAT))) if self.item else None
        except (KeyError, ValueError):
            return None


def queue_lines(directory: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """(line, item) for each line of queue.jsonl, oldest first; item None for a line that is not a queue item."""
    path = Path(directory) / QUEUE_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [(line if line.endswith("\n") else line + "\n", parse_item(line)) for line in fh if line.strip()]


def parse_item(line: str) -> dict[str, Any] | None:
    try:
        item = json.loads(line)
    except ValueError:
        return None
    return item if isinstance(item, dict) and {"item_id", "image", "image_sha256"} <= set(item) else None


def imported_images(directory: Path) -> set[str]:
    """sha256 of every queued image a `review import` put into the data (or found there already)."""
    found: set[str] = set()
    for path in (Path(directory) / IMPORTS_DIR).glob("import-*.json"):
        report = read_json_or_none(path)
        if isinstance(report, dict):
            for entry in [*(report.get("imported") or []), *(report.get("skipped") or [])]:
                if isinstance(entry, dict) and entry.get("image_sha256"):
                    found.add(str(entry["image_sha256"]))
    return found


def is_protected(item: dict[str, Any], imported: set[str]) -> bool:
    """A feedback item with a human label (a class, not "wrong") whose image no import has taken in yet."""
    labelled = item.get("reason") == "feedback" and item.get("feedback_label") not in (None, "", "wrong")
    return labelled and item.get("image_sha256") not in imported


def read_entries(directory: Path) -> list[QueueEntry]:
    """queue.jsonl with each item's image size and protection, oldest first."""
    directory = Path(directory)
    imported = imported_images(directory)
    sizes: dict[str, int] = {}
    entries = []
    for line, item in queue_lines(directory):
        if item is None:
            entries.append(QueueEntry(line, None))
            continue
        image = str(item["image"])
        if image not in sizes:
            with suppress(OSError):
                sizes[image] = (directory / image).stat().st_size
        entries.append(QueueEntry(line, item, sizes.get(image, 0), is_protected(item, imported)))
    return entries


def kept_bytes(entries: list[QueueEntry], removed: dict[int, str]) -> int:
    """Bytes of the entries not in `removed`: their lines plus each image they use, once."""
    kept = [e for i, e in enumerate(entries) if i not in removed]
    images = {e.image: e.image_bytes for e in kept if e.image}
    return sum(len(e.line.encode()) for e in kept) + sum(images.values())


def plan_pruning(entries: list[QueueEntry], retention: Retention, now: float) -> dict[int, str]:
    """Index -> reason ("invalid", "age", "size") of each entry retention removes; `entries` oldest first.

    Unreadable lines go; unprotected items older than max_age go; then, when the rest exceeds max_bytes,
    the oldest unprotected items until it fits in PRUNE_TO of max_bytes."""
    plan: dict[int, str] = {}
    for i, entry in enumerate(entries):
        if entry.item is None:
            plan[i] = "invalid"
        elif not entry.protected and entry.created is not None and retention.too_old(entry.created, now):
            plan[i] = "age"
    total = kept_bytes(entries, plan)
    if not retention.too_big(total):
        return plan
    target = int(retention.max_bytes * PRUNE_TO)
    users = Counter(e.image for i, e in enumerate(entries) if i not in plan)
    for i, entry in enumerate(entries):
        if total <= target:
            break
        if i in plan or entry.protected:
            continue
        plan[i] = "size"
        total -= len(entry.line.encode())
        users[entry.image] -= 1
        if users[entry.image] == 0:
            total -= entry.image_bytes
    return plan


def read_queue(directory: Path) -> list[dict[str, Any]]:
    """Every queue item, oldest first (lines cut short by a crash are skipped)."""
    return [item for _, item in queue_lines(directory) if item is not None]


def queue_tail(directory: Path, max_bytes: int) -> list[bytes]:
    """The whole lines among the last `max_bytes` of queue.jsonl, oldest first (none when it is missing)."""
    try:
        with open(Path(directory) / QUEUE_FILE, "rb") as fh:
            start = max(0, fh.seek(0, os.SEEK_END) - max_bytes)
            fh.seek(start)
            lines = fh.read().split(b"\n")
    except OSError:
        return []
    return lines[1:] if start > 0 else lines  # the first line read may be cut


def item_for_prediction(directory: Path, prediction_id: str, max_bytes: int = FIND_MAX_BYTES) -> dict[str, Any] | None:
    """The newest queue item of prediction `prediction_id` within the last `max_bytes` of queue.jsonl, or None.
    For a feedback on a prediction the service no longer remembers: bounded, since a queue may hold a gigabyte."""
    needle = json.dumps(prediction_id).encode()  # as `add` writes it; a cheap test before parsing a line
    for line in reversed(queue_tail(directory, max_bytes)):
        if needle in line:
            item = parse_item(line.decode("utf-8", errors="replace"))
            if item is not None and item.get("prediction_id") == prediction_id:
                return item
    return None


# ---- export ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewExport:
    n_items: int
    csv: Path
    labelstudio_tasks: Path
    labelstudio_config: Path

    def __str__(self) -> str:
        return (
            f"exported {self.n_items} review item(s): {self.csv} (fill in corrected_label), "
            f"Label Studio: {self.labelstudio_tasks} with {self.labelstudio_config}"
        )


LS_IMAGE = "image"  # the <Image> tag's name, and the task `data` key holding the image URL
LS_CHOICES = "label"  # the <Choices> tag's name: predictions and annotations name it as from_name
CONTEXT_PREFIX = "context."  # review.csv columns holding the request context


def labelstudio_config(classes: Iterable[str]) -> str:
    """The labelling config; its tag names are the ones `labelstudio_task`'s predictions refer to."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        f"<View>\n  <Image name={quoteattr(LS_IMAGE)} value=\"${LS_IMAGE}\"/>\n"
        f"  <Choices name={quoteattr(LS_CHOICES)} toName={quoteattr(LS_IMAGE)} choice=\"single\" showInLine=\"true\">\n"
        f"{choices}\n  </Choices>\n</View>\n"
    )


def item_context(item: dict[str, Any]) -> dict[str, str]:
    """The request context the service recorded with the item (column -> text); {} for items without one."""
    context = item.get("context") or {}
    if not isinstance(context, dict):
        return {}
    return {str(k): "" if v is None else str(v) for k, v in context.items()}


def labelstudio_task(item: dict[str, Any], url_prefix: str) -> dict[str, Any]:
    """One task of a Label Studio import: the image URL, our ids and the request context in `data`, the model's
    (or the feedback's) label as a prediction to confirm or change."""
    label = item.get("feedback_label") if item.get("feedback_label") not in (None, "wrong") else item.get("predicted_label")
    data: dict[str, Any] = {LS_IMAGE: f"{url_prefix}{item['image']}", "item_id": item["item_id"], "image_sha256": item["image_sha256"]}
    if item_context(item):
        data["context"] = item_context(item)
    task: dict[str, Any] = {"data": data, "meta": {"reason": item["reason"], "model_version": item.get("model_version")}}
    if label:
        prediction: dict[str, Any] = {
            "model_version": str(item.get("model_version")),
            "result": [{"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices", "value": {"choices": [label]}}],
        }
        if isinstance(item.get("confidence"), (int, float)):
            prediction["score"] = float(item["confidence"])
        task["predictions"] = [prediction]
    return task


def review_csv_columns(items: list[dict[str, Any]]) -> list[str]:
    """CSV_COLUMNS with a `context.<column>` column per context column any item has, before corrected_label."""
    context = sorted({f"{CONTEXT_PREFIX}{c}" for item in items for c in item_context(item)})
    return [*CSV_COLUMNS[:-1], *context, CSV_COLUMNS[-1]]


def review_csv_row(item: dict[str, Any], review_dir: Path) -> dict[str, Any]:
    row = {k: item.get(k) for k in CSV_COLUMNS}
    row["image"] = str((Path(review_dir) / item["image"]).resolve())
    row["corrected_label"] = ""
    row.update({f"{CONTEXT_PREFIX}{c}": v for c, v in item_context(item).items()})
    return row


def export_queue(review_dir: Path, out_dir: Path, classes: list[str], url_prefix: str = "/data/local-files/?d=") -> ReviewExport:
    """Write the whole queue (oldest first) as CSV + Label Studio import files into out_dir."""
    items = read_queue(review_dir)
    out_dir = Path(out_dir)
    csv_path, tasks_path, config_path = out_dir / "review.csv", out_dir / "labelstudio_tasks.json", out_dir / "labelstudio_config.xml"
    with atomic_path(csv_path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=review_csv_columns(items))
            writer.writeheader()
            writer.writerows(review_csv_row(item, review_dir) for item in items)
    write_json_atomic(tasks_path, [labelstudio_task(i, url_prefix) for i in items])
    write_text_atomic(config_path, labelstudio_config(classes))
    return ReviewExport(len(items), csv_path, tasks_path, config_path)


# ---- import ---------------------------------------------------------------------------------------------


def read_corrections(path: Path) -> dict[str, list[str]]:
    """item_id -> corrected label(s), from review.csv (corrected_label filled) or a Label Studio JSON export."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corrections file {path} does not exist")
    found: dict[str, list[str]] = defaultdict(list)
    if path.suffix.lower() == ".json":
        try:
            tasks = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(tasks, list):
            raise DataError(f"{path} is not a Label Studio export (expected a JSON list of tasks)")
        for number, task in enumerate(tasks, start=1):
            item_id, label = labelstudio_choice(task)
            if item_id and label:
                task_id = f"task {number}" + (f" (Label Studio id {task['id']})" if "id" in task else "")
                found[str(item_id)].append(checked_label(label, f"{path}: {task_id} (item {item_id})"))
        return dict(found)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"item_id", "corrected_label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs the columns item_id and corrected_label (as written by `lensmith review export`)")
        for row in reader:
            label = (row.get("corrected_label") or "").strip()
            item_id = (row.get("item_id") or "").strip()
            if item_id and label:
                found[item_id].append(checked_label(label, f"{path}: line {reader.line_num} (item {item_id})"))
    return dict(found)


def checked_label(label: str, where: str) -> str:
    """`label` when it is a safe folder name; DataError naming `where` (the row) and the rule otherwise."""
    problem = label_problem(label)
    if problem is not None:
        raise DataError(
            f"{where}: corrected label {label!r} cannot be used as a folder name: {problem}; "
            "a label is a single folder name (no /, \\, '..', leading dot or control characters); nothing was imported"
        )
    return label


def annotation_choice(annotation: Any) -> str | None:
    """The class an annotation chose with our <Choices> tag (None: cancelled, skipped or no choice)."""
    if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
        return None
    for result in annotation.get("result") or []:
        if not isinstance(result, dict) or result.get("from_name", LS_CHOICES) != LS_CHOICES:
            continue
        choices = (result.get("value") or {}).get("choices") or []
        if choices:
            return str(choices[0]).strip()
    return None


def labelstudio_choice(task: Any) -> tuple[str | None, str | None]:
    """(item_id, label of the latest non-cancelled annotation) from one task of a Label Studio JSON export.
    Latest: the largest updated_at (else created_at); Label Studio writes them as ISO 8601 UTC, which sort as text."""
    if not isinstance(task, dict):
        return None, None
    item_id = (task.get("data") or {}).get("item_id")
    chosen = [
        (str(a.get("updated_at") or a.get("created_at") or ""), position, label)
        for position, a in enumerate(task.get("annotations") or [])
        if (label := annotation_choice(a)) is not None
    ]
    return item_id, max(chosen)[2] if chosen else None


@dataclass
class ImportReport:
    imported: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None

    @property
    def labels_written(self) -> list[str]:
        """The label folders this import added images to."""
        return sorted({str(entry["label"]) for entry in self.imported})

    def __str__(self) -> str:
        lines = [f"imported {len(self.imported)} corrected image(s); skipped {len(self.skipped)}; conflicts {len(self.conflicts)}"]
        lines += [f"  conflict: {c['reason']}: {c['detail']}" for c in self.conflicts[:20]]
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


@dataclass(frozen=True)
class PlannedImage:
    """One corrected image an import writes: its bytes, where they go and its metadata.csv row."""

    target: Path
    data: bytes
    row: dict[str, str]
    entry: dict[str, Any]


def metadata_row(item: dict[str, Any], label: str, relative: str, imported_at: str) -> tuple[dict[str, str], list[str]]:
    """The reviewed metadata.csv row of one corrected image, and the context columns left out (they would
    shadow a column ingest or the import writes)."""
    context = item_context(item)
    reserved = {*MANIFEST_COLUMNS, *SPLIT_ADDED_COLUMNS, *REVIEW_COLUMNS}
    ignored = sorted(c for c in context if c in reserved)
    row = {c: v for c, v in context.items() if c not in ignored}
    provenance = {
        "review_item_id": item["item_id"],
        "review_reason": item.get("reason"),
        "review_label": label,
        "review_predicted_label": item.get("predicted_label"),
        "review_confidence": item.get("confidence"),
        "review_model_version": item.get("model_version"),
        "review_served_at": item.get("time"),
        "review_imported_at": imported_at,
    }
    row.update({k: "" if v is None else str(v) for k, v in provenance.items()})
    return {"path": relative, **row}, ignored


def write_planned(reviewed_dir: Path, planned: list[PlannedImage]) -> list[PlannedImage]:
    """Write the images, then metadata.csv (atomic rename): all or nothing. The images another writer put there
    first are left out (returned as not written); any failure removes what this call wrote and re-raises."""
    written: list[PlannedImage] = []
    try:
        for plan in planned:
            if write_new_file(plan.target, plan.data):
                written.append(plan)
        if written:
            append_metadata_rows(reviewed_dir, [plan.row for plan in written])
    except BaseException:
        for plan in written:
            plan.target.unlink(missing_ok=True)
        raise
    return written


def import_corrections(
    review_dir: Path,
    corrections: dict[str, list[str]],
    reviewed_dir: Path,
    classes: list[str],
    known_labels: dict[str, set[str]] | None = None,
    allow_new_labels: bool = False,
) -> ImportReport:
    """Write corrected images into the reviewed-data folder (`<reviewed_dir>/<label>/<sha256>.<ext>` + a
    metadata.csv row each; lensmith.reviewed), never into another source. `known_labels`: sha256 -> labels
    already in the data (every source); images there under another label are conflicts, under the same label skipped."""
    for item_id, labels in corrections.items():  # before anything is written
        for label in labels:
            checked_label(label, f"item {item_id}")
    reviewed_dir = Path(reviewed_dir)
    ensure_reviewed_folder(reviewed_dir)
    items = {item["item_id"]: item for item in read_queue(review_dir)}
    existing: dict[str, set[str]] = defaultdict(set)
    for sha, labels in [*(known_labels or {}).items(), *labels_in_folder(reviewed_dir).items()]:
        existing[sha] |= set(labels)
    report = ImportReport()

    by_image: dict[str, set[str]] = defaultdict(set)
    item_of_image: dict[str, dict[str, Any]] = {}
    for item_id, labels in corrections.items():
        item = items.get(item_id)
        if item is None:
            report.conflicts.append({"item_id": item_id, "reason": "unknown_item", "detail": f"{item_id} is not in the review queue"})
            continue
        by_image[item["image_sha256"]] |= set(labels)
        item_of_image[item["image_sha256"]] = item

    imported_at = time.strftime(TIME_FORMAT, time.gmtime())
    planned: list[PlannedImage] = []
    for sha, labels in sorted(by_image.items()):
        item = item_of_image[sha]
        entry = {"image_sha256": sha, "item_id": item["item_id"], "labels": sorted(labels)}
        if len(labels) > 1:
            report.conflicts.append({**entry, "reason": "disagreeing_labels", "detail": f"{sha[:12]} was labelled {sorted(labels)}"})
            continue
        label = next(iter(labels))
        if label not in classes and not allow_new_labels:
            report.conflicts.append({**entry, "reason": "unknown_label", "detail": f"{label!r} is not one of {classes}"})
            continue
        if existing.get(sha) and label not in existing[sha]:
            report.conflicts.append(
                {**entry, "reason": "label_differs_from_data", "detail": f"{sha[:12]} is already in the data as {sorted(existing[sha])}, corrected to {label!r}"}
            )
            continue
        if existing.get(sha):
            report.skipped.append({**entry, "reason": "already_in_data"})
            continue
        image = Path(review_dir) / item["image"]
        target = reviewed_dir / label / image.name
        if not inside(image, Path(review_dir) / IMAGES_DIR) or not inside(target, reviewed_dir):
            report.conflicts.append({**entry, "reason": "outside_folder", "detail": f"{image} or {target} leaves its folder; nothing written"})
            continue
        if not image.is_file():
            report.conflicts.append({**entry, "reason": "image_pruned", "detail": f"{image} was removed by the queue's retention; nothing written"})
            continue
        row, ignored = metadata_row(item, label, f"{label}/{image.name}", imported_at)
        planned.append(PlannedImage(target, image.read_bytes(), row, {**entry, "label": label, "file": str(target),
                                                                           **({"context_ignored": ignored} if ignored else {})}))

    written = write_planned(reviewed_dir, planned)
    report.imported = [plan.entry for plan in written]
    written_ids = {id(plan) for plan in written}
    report.conflicts += [
        {**plan.entry, "reason": "target_exists", "detail": f"{plan.target} exists; nothing overwritten"}
        for plan in planned if id(plan) not in written_ids
    ]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    report.report_path = Path(review_dir) / IMPORTS_DIR / f"import-{stamp}-{uuid.uuid4().hex[:6]}.json"
    write_json_atomic(report.report_path, {"imported": report.imported, "skipped": report.skipped, "conflicts": report.conflicts})
    return report


def manifest_labels(manifest: Path) -> dict[str, set[str]]:
    """sha256 -> labels from data/manifest.parquet (empty when there is none yet)."""
    if not manifest.is_file():
        return {}
    import pandas as pd

    frame = pd.read_parquet(manifest, columns=None)
    if not {"sha256", "label"} <= set(frame.columns):
        return {}
    labels: dict[str, set[str]] = defaultdict(set)
    for sha, label in zip(frame["sha256"].astype(str), frame["label"].astype(str)):
        labels[sha].add(label)
    return dict(labels)
