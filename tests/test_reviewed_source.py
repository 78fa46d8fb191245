"""Corrections are a source of their own (issue #18): `review import` writes into data.reviewed_dir, ingest reads it
with data.source and data.sources, the split takes new images in stably, and a rerun of another stage cannot
touch them."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write_test_image
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import GateFailedError
from lensmith.ingest import run_ingest
from lensmith.layout import Layout
from lensmith.params import Params, SplitParams
from lensmith.resolve import resolve
from lensmith.reviewed import ensure_reviewed_folder
from lensmith.serve import review
from lensmith.serve.review import import_corrections, read_corrections
from lensmith.split import read_previous_assignments, run_split
from lensmith.testing.project import make_project, run
from lensmith.validate import run_validate

FIXTURES = Path(__file__).parent / "fixtures"
CLASSES = ["crack", "ok"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(tmp_path: Path, seed: int) -> bytes:
    return write_test_image(tmp_path / "made" / f"{seed}.png", seed=seed).read_bytes()


def queued(review_dir: Path, item_id: str, image: bytes, *, context: dict[str, str] | None = None, predicted: str = "ok") -> str:
    """A queue item as the service writes it (with the request context when the request carried one)."""
    digest = sha(image)
    (review_dir / "images").mkdir(parents=True, exist_ok=True)
    (review_dir / "images" / f"{digest}.png").write_bytes(image)
    item = {
        "item_id": item_id, "time": "2025-01-02T03:04:05Z", "reason": "feedback", "image": f"images/{digest}.png",
        "image_sha256": digest, "prediction_id": f"p-{item_id}", "predicted_label": predicted, "confidence": 0.42,
        "model_version": "v0003", "feedback_label": "wrong",
    }
    if context is not None:
        item["context"] = context
    with open(review_dir / "queue.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(item) + "\n")
    return digest


def params_for(source: Path, **data: object) -> Params:
    params = Params()
    params.data.source = str(source)
    params.data.workers = 1
    for key, value in data.items():
        setattr(params.data, key, value)
    params.validate.min_images_per_class = 2
    params.split.min_class_size = 2
    return params


def metadata_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ---- the reviewed folder ----------------------------------------------------------------------------------


def test_import_writes_images_and_metadata_rows_into_the_reviewed_folder(tmp_path: Path) -> None:
    review_dir, reviewed = tmp_path / "serving" / "review", tmp_path / "data" / "reviewed"
    a = queued(review_dir, "item-a", png(tmp_path, 900), context={"site": "C", "camera": "cam9"})
    b = queued(review_dir, "item-b", png(tmp_path, 901))  # an item queued before requests carried context
    report = import_corrections(review_dir, {"item-a": ["crack"], "item-b": ["ok"]}, reviewed, CLASSES)
    assert len(report.imported) == 2 and report.labels_written == ["crack", "ok"]
    assert (reviewed / "crack" / f"{a}.png").is_file() and (reviewed / "ok" / f"{b}.png").is_file()
    assert (reviewed / "README.md").is_file()

    rows = {row["review_item_id"]: row for row in metadata_rows(reviewed)}
    assert rows["item-a"]["path"] == f"crack/{a}.png" and rows["item-a"]["site"] == "C" and rows["item-a"]["camera"] == "cam9"
    assert rows["item-a"]["review_label"] == "crack" and rows["item-a"]["review_predicted_label"] == "ok"
    assert rows["item-a"]["review_model_version"] == "v0003" and rows["item-a"]["review_served_at"] == "2025-01-02T03:04:05Z"
    assert rows["item-a"]["review_imported_at"] and rows["item-b"]["site"] == ""

    # a later import keeps the rows already there
    c = queued(review_dir, "item-c", png(tmp_path, 902), context={"site": "C", "line": "3"})
    import_corrections(review_dir, {"item-c": ["crack"]}, reviewed, CLASSES)
    rows = metadata_rows(reviewed)
    assert sorted(r["review_item_id"] for r in rows[:2]) == ["item-a", "item-b"] and rows[2]["review_item_id"] == "item-c"
    assert rows[2]["line"] == "3" and rows[2]["path"] == f"crack/{c}.png"


def test_a_failed_import_leaves_no_image_and_no_half_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    review_dir, reviewed = tmp_path / "serving" / "review", tmp_path / "data" / "reviewed"
    queued(review_dir, "item-a", png(tmp_path, 900))
    queued(review_dir, "item-b", png(tmp_path, 901))
    ensure_reviewed_folder(reviewed)
    before = (reviewed / "metadata.csv").read_bytes()

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(review, "append_metadata_rows", disk_full)
    with pytest.raises(OSError):
        import_corrections(review_dir, {"item-a": ["crack"], "item-b": ["ok"]}, reviewed, CLASSES)
    assert sorted(p.name for p in reviewed.rglob("*") if p.is_file()) == ["README.md", "metadata.csv"]
    assert (reviewed / "metadata.csv").read_bytes() == before


def test_bad_corrections_are_reported_and_not_imported(tmp_path: Path) -> None:
    review_dir, reviewed = tmp_path / "serving" / "review", tmp_path / "data" / "reviewed"
    in_data = queued(review_dir, "in-data", png(tmp_path, 900))
    queued(review_dir, "twice", png(tmp_path, 901))
    pruned = queued(review_dir, "pruned", png(tmp_path, 902))
    (review_dir / "images" / f"{pruned}.png").unlink()
    corrections = {"in-data": ["crack"], "twice": ["crack", "ok"], "pruned": ["ok"]}
    report = import_corrections(review_dir, corrections, reviewed, CLASSES, known_labels={in_data: {"ok"}})
    reasons = {c["item_id"]: c["reason"] for c in report.conflicts}
    assert reasons == {"in-data": "label_differs_from_data", "twice": "disagreeing_labels", "pruned": "image_pruned"}
    assert not report.imported and metadata_rows(reviewed) == []

    # an image the reviewed folder holds already (an earlier import) counts as in the data too
    first = queued(review_dir, "first", png(tmp_path, 903))
    import_corrections(review_dir, {"first": ["ok"]}, reviewed, CLASSES)
    queued(review_dir, "again", png(tmp_path, 903))
    report = import_corrections(review_dir, {"again": ["crack"]}, reviewed, CLASSES)
    assert [c["reason"] for c in report.conflicts] == ["label_differs_from_data"] and not (reviewed / "crack").exists()
    assert [r["path"] for r in metadata_rows(reviewed)] == [f"ok/{first}.png"]


def test_review_import_refuses_a_reviewed_dir_inside_a_stage_output(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "data" / "raw" / "demo" / "ok").mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": "true", "outs": ["data/made"]}}}))
    params = {"validate": {"labels": CLASSES}, "data": {"source": "data/raw/demo", "reviewed_dir": "data/made/reviewed"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    queued(root / "serving" / "review", "item-a", png(tmp_path, 900))
    corrections = tmp_path / "review.csv"
    corrections.write_text("item_id,corrected_label\nitem-a,crack\n")
    result = CliRunner().invoke(app, ["review", "import", str(corrections), "--root", str(root), "--params", str(root / "params.yaml")])
    assert result.exit_code != 0 and "overlaps the output 'data/made' of stage 'make'" in result.output
    assert not (root / "data" / "made").exists()


# ---- Label Studio -----------------------------------------------------------------------------------------


def test_a_labelstudio_json_export_is_read_latest_annotation_first(tmp_path: Path) -> None:
    # fixtures/labelstudio_export.json: Label Studio's JSON export as written (ids, annotations with was_cancelled,
    # ground_truth, created_at/updated_at, lead_time, completed_by, predictions, meta)
    corrections = read_corrections(FIXTURES / "labelstudio_export.json")
    assert corrections == {
        "0f3c5a1e9b7d4c2a8e6f1b3d5a7c9e01": ["crack"],  # the latest (updated_at) annotation wins, not the last listed
        "5b2e8d4f6a1c3e7b9d0f2a4c6e8b1d03": ["ok"],  # the cancelled (latest) annotation does not count
    }  # the task without an annotation gives nothing


def test_the_export_carries_the_request_context_and_matches_its_labelling_config(tmp_path: Path) -> None:
    review_dir = tmp_path / "serving" / "review"
    queued(review_dir, "item-a", png(tmp_path, 900), context={"site": "C", "camera": "cam9"})
    queued(review_dir, "item-b", png(tmp_path, 901))
    export = review.export_queue(review_dir, tmp_path / "out", CLASSES)
    rows = list(csv.DictReader(open(export.csv)))
    assert rows[0]["context.site"] == "C" and rows[0]["context.camera"] == "cam9" and rows[1]["context.site"] == ""
    tasks = json.loads(export.labelstudio_tasks.read_text())
    assert tasks[0]["data"]["context"] == {"site": "C", "camera": "cam9"} and "context" not in tasks[1]["data"]
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == "v0003" and prediction["score"] == pytest.approx(0.42)
    (result,) = prediction["result"]
    config = export.labelstudio_config.read_text()
    assert result["type"] == "choices" and result["value"] == {"choices": ["ok"]}
    assert f'<Choices name="{result["from_name"]}" toName="{result["to_name"]}"' in config
    assert f'<Image name="{result["to_name"]}" value="$image"/>' in config and tasks[0]["data"]["image"].endswith(".png")


# ---- ingest of several sources ------------------------------------------------------------------------------


def test_ingest_reads_data_source_and_the_reviewed_folder_with_its_metadata(tiny_image_folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    layout, review_dir = Layout(root), root / "serving" / "review"
    a = queued(review_dir, "item-a", png(tmp_path, 900), context={"site": "C", "camera": "cam9"})
    b = queued(review_dir, "item-b", png(tmp_path, 901))
    import_corrections(review_dir, {"item-a": ["crack"], "item-b": ["ok"]}, root / "data" / "reviewed", CLASSES)
    params = params_for(tiny_image_folder)
    run_ingest(params, layout)

    manifest = pd.read_parquet(layout.manifest)
    assert (manifest["source"] == str(tiny_image_folder)).sum() == 12
    reviewed = manifest[manifest["source"] == "data/reviewed"].set_index("review_item_id")
    assert sorted(reviewed["path"]) == [f"data/reviewed/crack/{a}.png", f"data/reviewed/ok/{b}.png"]
    assert reviewed.loc["item-a", "site"] == "C" and reviewed.loc["item-a", "label"] == "crack"
    assert reviewed.loc["item-a", "review_predicted_label"] == "ok" and pd.isna(reviewed.loc["item-b", "site"])

    # auto: what data.source declares; provenance is not metadata every image must have
    resolved = resolve(params, manifest, CLASSES)
    assert resolved.required_metadata == ("site", "lighting", "camera", "batch")
    assert not any(c.startswith("review_") for c in resolved.metadata_columns)
    result = run_validate(params, layout)  # reviewed rows without context do not fail the gate: a warning
    checks = {c.name: c for c in result.checks}
    assert checks["metadata_not_null:site"].success
    warned = checks["metadata_missing_in_other_sources:lighting"]
    assert not warned.success and not warned.blocking


def test_the_same_image_in_two_sources_is_one_row_or_a_label_conflict(tiny_image_folder: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    (extra / "ok").mkdir(parents=True)
    shutil.copy2(tiny_image_folder / "ok" / "ok_00.png", extra / "ok" / "copy.png")  # same image, same label
    layout = Layout(tmp_path / "proj")
    params = params_for(tiny_image_folder, sources=[str(extra)])
    summary = run_ingest(params, layout)
    assert summary.n_images == 12 and summary.n_copies == 1
    quarantine = pd.read_csv(layout.quarantine)
    assert quarantine.loc[0, "reason"] == "copy_in_other_source" and quarantine.loc[0, "path"] == f"{extra}/ok/copy.png"

    shutil.copy2(tiny_image_folder / "crack" / "crack_00.png", extra / "ok" / "relabelled.png")  # same image, other label
    run_ingest(params, layout)
    with pytest.raises(GateFailedError):
        run_validate(params, layout)
    checks = {c["name"]: c for c in json.loads(layout.validation_json.read_text())["checks"]}
    assert checks["sha256_one_label"]["success"] is False


# ---- the split takes new images in stably -----------------------------------------------------------------


def test_corrected_images_join_their_groups_split_and_nothing_moves(tiny_image_folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "proj"
    layout, review_dir = Layout(root), root / "serving" / "review"
    params = params_for(tiny_image_folder)
    params.split = SplitParams(train=0.34, val=0.33, test=0.33, min_class_size=2)  # one batch of each class per split
    run_ingest(params, layout)
    run_split(params, layout)
    before = read_previous_assignments(layout)
    splits = pd.concat([pd.read_parquet(layout.split_file(n)) for n in ("train", "val", "test")])
    test_batch = str(splits.loc[splits["split"] == "test", "batch"].iloc[0])

    known = queued(review_dir, "known", png(tmp_path, 900), context={"batch": test_batch, "site": "A"})
    new = queued(review_dir, "new", png(tmp_path, 901), context={"batch": "new-batch", "site": "A"})
    import_corrections(review_dir, {"known": ["crack"], "new": ["ok"]}, root / "data" / "reviewed", CLASSES)
    run_ingest(params, layout)
    summary = run_split(params, layout)
    after = read_previous_assignments(layout)
    assert after[before.index].equals(before)  # every image already split keeps its split
    assert after[f"data/reviewed/crack/{known}.png"] == "test"  # a corrected image of a test group stays in test
    assert f"data/reviewed/ok/{new}.png" in after.index and summary.n_new == 2
    run_split(params, layout)
    assert read_previous_assignments(layout).equals(after)  # and a rerun moves nothing


# ---- end to end: a rerun of the demo stage cannot delete the corrections -------------------------------------


@pytest.mark.slow
def test_imported_corrections_survive_a_rerun_of_the_demo_stage_and_are_ingested(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", ["demo.per_class=8", "validate.labels=null"])
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "repro", "--single-item", "demo_data"], root)
    classes = sorted(p.name for p in (root / "data" / "raw" / "demo").iterdir() if p.is_dir())
    review_dir = root / "serving" / "review"
    digest = queued(review_dir, "item-a", png(tmp_path, 900), context={"site": "C"}, predicted=classes[0])
    corrections = tmp_path / "review.csv"
    corrections.write_text(f"item_id,corrected_label\nitem-a,{classes[1]}\n")
    output = run([sys.executable, "-m", "lensmith.cli", "review", "import", str(corrections), "--allow-new-labels"], root).stdout
    assert "imported 1" in output and f"data/reviewed/{classes[1]}.dvc" in output
    image = root / "data" / "reviewed" / classes[1] / f"{digest}.png"
    assert image.is_file() and (root / "data" / "reviewed" / f"{classes[1]}.dvc").is_file()
    assert f"/{classes[1]}" in (root / "data" / "reviewed" / ".gitignore").read_text()

    run([*dvc, "repro", "--force", "--single-item", "demo_data"], root)  # deletes and rewrites data/raw/demo
    assert image.is_file() and len(metadata_rows(root / "data" / "reviewed")) == 1
    assert run([*dvc, "status", "--json", f"data/reviewed/{classes[1]}.dvc"], root).stdout.strip() == "{}"
    changed = run(["git", "status", "--porcelain", "--untracked-files=all", "data/reviewed"], root).stdout
    assert f"data/reviewed/{classes[1]}.dvc" in changed and "data/reviewed/metadata.csv" in changed  # for the nightly's commit
    assert f"data/reviewed/{classes[1]}/" not in changed  # the images themselves go to DVC, not git

    run([*dvc, "repro", "--single-item", "ingest"], root)
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    row = manifest[manifest["source"] == "data/reviewed"].iloc[0]
    assert row["path"] == f"data/reviewed/{classes[1]}/{digest}.png" and row["site"] == "C" and row["review_item_id"] == "item-a"


def test_a_nightly_commit_records_the_reviewed_folder(tmp_path: Path) -> None:
    from flows.nightly import recorded_paths

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(Path(__file__).parents[1] / name, tmp_path / name)
    reviewed = tmp_path / "data" / "reviewed"
    ensure_reviewed_folder(reviewed)
    (reviewed / "crack.dvc").write_text("outs:\n- path: crack\n")
    (reviewed / ".gitignore").write_text("/crack\n")
    paths = recorded_paths(tmp_path, "data/reviewed")
    for path in ("metadata.csv", "README.md", "crack.dvc", ".gitignore"):
        assert f"data/reviewed/{path}" in paths


def test_params_refuse_a_reviewed_dir_inside_data_source() -> None:
    from lensmith.errors import ParamsError
    from lensmith.params import params_from_dict

    with pytest.raises(ParamsError, match="reviewed_dir 'data/raw/demo/reviewed' overlaps data.source"):
        params_from_dict({"data": {"source": "data/raw/demo", "reviewed_dir": "data/raw/demo/reviewed"}}, "test params")
