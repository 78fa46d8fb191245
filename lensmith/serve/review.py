"""The review queue (the flywheel's inbox) and `lensmith review export|import`.

On disk, under serve.review_dir:
  images/<sha256>.<ext>   each queued image once, content-addressed, never overwritten
  queue.jsonl             one appended line per item (low confidence or feedback), never rewritten
  imports/<stamp>.json    what each `review import` did

`export_queue` writes the queue as review.csv (fill in `corrected_label`) plus a Label Studio import
(labelstudio_tasks.json with the model's prediction pre-filled, labelstudio_config.xml).
`import_corrections` reads that CSV or a Label Studio JSON export and copies each corrected image into
the raw data as a NEW file, `<source>/<label>/reviewed-<stamp>/<sha256>.<ext>` (the label is the first
folder, as ingest expects); it never overwrites and reports every conflict instead of guessing.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from lensmith.errors import DataError
from lensmith.fsutil import atomic_path, write_json_atomic, write_text_atomic

QUEUE_FILE = "queue.jsonl"
IMAGES_DIR = "images"
IMPORTS_DIR = "imports"
REVIEWED_PREFIX = "reviewed-"
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


class ReviewQueue:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def image_path(self, sha256: str, ext: str) -> Path:
        return self.directory / IMAGES_DIR / f"{sha256}.{ext}"

    def add(self, *, image: bytes, sha256: str, ext: str, reason: str, prediction: dict[str, Any], feedback_label: str | None = None) -> str:
        """Queue one image; returns the new item id."""
        write_new_file(self.image_path(sha256, ext), image)
        item = {
            "item_id": uuid.uuid4().hex,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
            "image": f"{IMAGES_DIR}/{sha256}.{ext}",
            "image_sha256": sha256,
            "prediction_id": prediction.get("id"),
            "predicted_label": prediction.get("label"),
            "confidence": prediction.get("confidence"),
            "model_version": prediction.get("model_version"),
            "feedback_label": feedback_label,
        }
        line = json.dumps(item, separators=(",", ":")) + "\n"
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / QUEUE_FILE, "a", encoding="utf-8") as fh:
                fh.write(line)
        return item["item_id"]


def read_queue(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / QUEUE_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


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


def labelstudio_config(classes: Iterable[str]) -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n  <Image name=\"image\" value=\"$image\"/>\n"
        f"  <Choices name=\"label\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n{choices}\n  </Choices>\n</View>\n"
    )


def labelstudio_task(item: dict[str, Any], url_prefix: str) -> dict[str, Any]:
    label = item.get("feedback_label") if item.get("feedback_label") not in (None, "wrong") else item.get("predicted_label")
    task: dict[str, Any] = {
        "data": {"image": f"{url_prefix}{item['image']}", "item_id": item["item_id"], "image_sha256": item["image_sha256"]},
        "meta": {"reason": item["reason"], "model_version": item.get("model_version")},
    }
    if label:
        task["predictions"] = [
            {
                "model_version": str(item.get("model_version")),
                "score": item.get("confidence"),
                "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}],
            }
        ]
    return task


def export_queue(review_dir: Path, out_dir: Path, classes: list[str], url_prefix: str = "/data/local-files/?d=") -> ReviewExport:
    """Write the whole queue (oldest first) as CSV + Label Studio import files into out_dir."""
    items = read_queue(review_dir)
    out_dir = Path(out_dir)
    csv_path, tasks_path, config_path = out_dir / "review.csv", out_dir / "labelstudio_tasks.json", out_dir / "labelstudio_config.xml"
    with atomic_path(csv_path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for item in items:
                row = {k: item.get(k) for k in CSV_COLUMNS}
                row["image"] = str((Path(review_dir) / item["image"]).resolve())
                row["corrected_label"] = ""
                writer.writerow(row)
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
        for task in tasks:
            item_id, label = labelstudio_choice(task)
            if item_id and label:
                found[item_id].append(label)
        return dict(found)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"item_id", "corrected_label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs the columns item_id and corrected_label (as written by `lensmith review export`)")
        for row in reader:
            label = (row.get("corrected_label") or "").strip()
            if row.get("item_id") and label:
                found[row["item_id"].strip()].append(label)
    return dict(found)


def labelstudio_choice(task: Any) -> tuple[str | None, str | None]:
    """(item_id, label of the latest non-cancelled annotation) from one exported Label Studio task."""
    if not isinstance(task, dict):
        return None, None
    item_id = (task.get("data") or {}).get("item_id")
    for annotation in reversed(task.get("annotations") or []):
        if annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            choices = (result.get("value") or {}).get("choices") or []
            if choices:
                return item_id, str(choices[0])
    return item_id, None


@dataclass
class ImportReport:
    imported: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None

    def __str__(self) -> str:
        lines = [f"imported {len(self.imported)} corrected image(s); skipped {len(self.skipped)}; conflicts {len(self.conflicts)}"]
        lines += [f"  conflict: {c['reason']}: {c['detail']}" for c in self.conflicts[:20]]
        if self.report_path is not None:
            lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


def reviewed_labels(source: Path) -> dict[str, set[str]]:
    """sha256 -> labels of images earlier imports placed under <source>/<label>/reviewed-*/."""
    labels: dict[str, set[str]] = defaultdict(set)
    for path in source.glob(f"*/{REVIEWED_PREFIX}*/*"):
        labels[path.stem].add(path.relative_to(source).parts[0])
    return labels


def import_corrections(
    review_dir: Path,
    corrections: dict[str, list[str]],
    source: Path,
    classes: list[str],
    known_labels: dict[str, set[str]] | None = None,
    allow_new_labels: bool = False,
) -> ImportReport:
    """Merge corrected labels into `source` as new files; `known_labels` is sha256 -> labels already in the data."""
    if not source.is_dir():
        raise DataError(f"data source {source} is not a local folder; review import writes into an image folder")
    items = {item["item_id"]: item for item in read_queue(review_dir)}
    existing: dict[str, set[str]] = defaultdict(set)
    for sha, labels in [*(known_labels or {}).items(), *reviewed_labels(source).items()]:
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

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
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
        target = source / label / f"{REVIEWED_PREFIX}{stamp}" / image.name
        if not write_new_file(target, image.read_bytes()):
            report.conflicts.append({**entry, "reason": "target_exists", "detail": f"{target} exists; nothing overwritten"})
            continue
        report.imported.append({**entry, "label": label, "file": str(target)})

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
