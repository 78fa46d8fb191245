"""`lensmith review export|import`: the queue out as CSV + Label Studio, corrected labels back as new files."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from servekit import jpeg_bytes

from lensmith.cli import app
from lensmith.serve.review import ReviewQueue, read_queue

CLASSES = ["crack", "ok", "scratch"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    source = root / "data" / "raw" / "demo"
    for i, label in enumerate(CLASSES):
        (source / label).mkdir(parents=True)
        (source / label / f"{label}_0.jpg").write_bytes(jpeg_bytes(100 + i))
    (root / "params.yaml").write_text(yaml.safe_dump({"validate": {"labels": CLASSES}, "data": {"source": "data/raw/demo"}}))
    return root


def queue_items(root: Path) -> dict[str, str]:
    queue = ReviewQueue(root / "serving" / "review")
    a, b = jpeg_bytes(1), jpeg_bytes(2)
    pred = {"id": "p1", "label": "ok", "confidence": 0.41, "model_version": "v0001"}
    return {
        "a_low": queue.add(image=a, sha256=sha(a), ext="jpg", reason="low_confidence", prediction=pred),
        "b_feedback": queue.add(image=b, sha256=sha(b), ext="jpg", reason="feedback", prediction={**pred, "id": "p2"}, feedback_label="crack"),
        "a_again": queue.add(image=a, sha256=sha(a), ext="jpg", reason="feedback", prediction=pred, feedback_label="wrong"),
    }


def invoke(root: Path, *args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--root", str(root), "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return result.output


def source_snapshot(root: Path) -> dict[str, str]:
    src = root / "data" / "raw" / "demo"
    return {str(p.relative_to(src)): sha(p.read_bytes()) for p in src.rglob("*") if p.is_file()}


def reviewed_images(root: Path) -> dict[str, str]:
    folder = root / "data" / "reviewed"
    return {p.relative_to(folder).as_posix(): sha(p.read_bytes()) for p in folder.glob("*/*") if p.is_file()}


def test_queue_stores_each_image_once_and_appends_items(project: Path) -> None:
    ids = queue_items(project)
    items = read_queue(project / "serving" / "review")
    assert [i["item_id"] for i in items] == list(ids.values())
    assert len(list((project / "serving" / "review" / "images").iterdir())) == 2


def test_export_writes_csv_and_labelstudio_import(project: Path) -> None:
    ids = queue_items(project)
    invoke(project, "review", "export", "--out", str(project / "out"))
    rows = list(csv.DictReader(open(project / "out" / "review.csv")))
    assert [r["item_id"] for r in rows] == list(ids.values())
    assert all(Path(r["image"]).is_file() and r["corrected_label"] == "" for r in rows)
    tasks = json.loads((project / "out" / "labelstudio_tasks.json").read_text())
    assert len(tasks) == 3 and tasks[0]["data"]["image"].startswith("/data/local-files/?d=images/")
    assert tasks[1]["predictions"][0]["result"][0]["value"]["choices"] == ["crack"]  # the feedback label pre-filled
    config = (project / "out" / "labelstudio_config.xml").read_text()
    assert all(f'<Choice value="{c}"/>' in config for c in CLASSES) and 'toName="image"' in config


def fill_csv(path: Path, labels: dict[str, str]) -> Path:
    rows = list(csv.DictReader(open(path)))
    for row in rows:
        row["corrected_label"] = labels.get(row["item_id"], "")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_import_adds_new_files_and_reports_conflicts_without_overwriting(project: Path) -> None:
    ids = queue_items(project)
    before = source_snapshot(project)
    invoke(project, "review", "export", "--out", str(project / "out"))
    filled = fill_csv(project / "out" / "review.csv", {ids["a_low"]: "crack", ids["a_again"]: "scratch", ids["b_feedback"]: "crack"})
    output = invoke(project, "review", "import", str(filled))
    assert "imported 1" in output and "conflicts 1" in output and "disagreeing_labels" in output

    assert source_snapshot(project) == before  # data.source is never written to
    after = reviewed_images(project)
    assert after == {f"crack/{sha(jpeg_bytes(2))}.jpg": sha(jpeg_bytes(2))}

    # importing again: already there -> skipped; a different label for the same image -> conflict, no file
    invoke(project, "review", "import", str(filled))
    again = fill_csv(project / "out" / "review.csv", {ids["b_feedback"]: "scratch"})
    output = invoke(project, "review", "import", str(again))
    assert "label_differs_from_data" in output
    assert reviewed_images(project) == after and source_snapshot(project) == before
    reports = sorted((project / "serving" / "review" / "imports").glob("import-*.json"))
    assert len(reports) == 3


def test_import_reads_a_labelstudio_export_and_rejects_unknown_labels(project: Path) -> None:
    ids = queue_items(project)
    export = [
        {"data": {"item_id": ids["a_low"]}, "annotations": [{"was_cancelled": False, "result": [{"value": {"choices": ["scratch"]}}]}]},
        {"data": {"item_id": ids["b_feedback"]}, "annotations": [{"was_cancelled": False, "result": [{"value": {"choices": ["dent"]}}]}]},
        {"data": {"item_id": "not-in-queue"}, "annotations": [{"result": [{"value": {"choices": ["ok"]}}]}]},
    ]
    path = project / "ls_export.json"
    path.write_text(json.dumps(export))
    output = invoke(project, "review", "import", str(path))
    assert "imported 1" in output and "unknown_label" in output and "unknown_item" in output
    assert list((project / "data/reviewed/scratch").glob("*.jpg"))
    assert not (project / "data/reviewed/dent").exists()
