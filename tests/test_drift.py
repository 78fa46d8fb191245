"""Drift: reference profile from a real exported model, Evidently report on real demo images, the trigger,
the prediction-log window and bad input (empty window, unknown labels, missing reference, broken files)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from servekit import copy_project, tiny_params

from lensmith.drift.current import WindowFilterError, load_log_window, parse_duration, parse_where, read_log_records
from lensmith.drift.embeddings import EmbeddingModel, fit_projection
from lensmith.drift.reference import build_reference, load_reference, onnx_model_path
from lensmith.drift.report import run_drift
from lensmith.drift.trigger import decide
from lensmith.errors import DataError
from lensmith.layout import Layout
from lensmith.params import DriftParams, Params

pytestmark = pytest.mark.timeout(900)


def drift_params(**drift: object) -> Params:
    params = tiny_params()
    # 4 components instead of 16: Evidently renders a plot per column, the slow part of these tests
    return params.model_copy(update={"drift": DriftParams(model="candidate", min_window=5, embedding_dims=4, **drift)})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = copy_project(tmp_path_factory.mktemp("drift"))
    build_reference(drift_params(), layout, layout.candidate)
    return layout


@pytest.fixture
def work(project: Layout, tmp_path: Path) -> Layout:
    """A fresh copy of the reference project for tests that write reports."""
    target = tmp_path / "p"
    shutil.copytree(project.root, target, ignore=shutil.ignore_patterns(".cache"))
    return Layout(target)


def write_shifted_copy(source: Path, target: Path, brightness: float) -> Path:
    """An ImageFolder copy of `source` with every image's brightness scaled (a new-lighting site)."""
    for file in sorted(source.rglob("*.jpg")):
        out = target / file.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageEnhance.Brightness(Image.open(file).convert("RGB")).enhance(brightness).save(out, quality=95)
    return target


# ---- reference ------------------------------------------------------------------------------------------


def test_reference_holds_stats_components_and_val_predictions(project: Layout) -> None:
    ref = load_reference(project.candidate)
    frame, meta = ref.frame, ref.meta
    assert set(frame["split"]) == {"train", "val"}
    assert {"brightness", "contrast", "sharpness", "mean_r", "mean_g", "mean_b", "width", "height"} <= set(frame.columns)
    assert ref.embedding_columns == [f"emb_pc{i:02d}" for i in range(1, len(ref.embedding_columns) + 1)]
    assert 1 <= len(ref.embedding_columns) <= 16
    assert frame[ref.embedding_columns].notna().all().all()
    preds = meta["predictions"]
    assert preds["split"] == "val" and 0 < preds["mean_confidence"] <= 1
    assert abs(sum(preds["class_distribution"].values()) - 1) < 1e-9
    assert meta["classes"] == sorted(meta["classes"]) and meta["model_version"]
    assert meta["embedding_provider"] == "CPUExecutionProvider" and meta["params"]["providers"] == "auto"  # no GPU here


def test_embeddings_come_from_the_onnx_model_and_agree_with_its_logits(project: Layout) -> None:
    from lensmith.onnxmodel import OnnxModel

    onnx_file = onnx_model_path(project, project.candidate)
    model = EmbeddingModel(onnx_file, project.cache_dir)
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    out = model.run_uint8(images)
    plain = OnnxModel.load(onnx_file).logits_uint8(images)
    assert out.embeddings.shape[0] == 6 and out.embeddings.shape[1] > 16
    np.testing.assert_allclose(out.probabilities.argmax(1), plain.argmax(1))
    assert list((project.cache_dir / "embeddings").glob("*.onnx")), "the rewritten graph is cached per model"


def test_pca_projection_round_trips_through_json() -> None:
    x = np.random.default_rng(1).normal(size=(50, 10))
    proj = fit_projection(x, 4)
    from lensmith.drift.embeddings import Projection

    again = Projection.from_dict(json.loads(json.dumps(proj.to_dict())))
    np.testing.assert_allclose(proj.transform(x), again.transform(x))
    assert fit_projection(x[:3], 16).components.shape[0] == 2, "never more components than images - 1"


# ---- the report -----------------------------------------------------------------------------------------


def test_same_images_do_not_drift_and_reports_are_written(work: Layout) -> None:
    result = run_drift(drift_params(), work, "data/raw/demo")
    report = json.loads(result.json_path.read_text())
    assert report["drift_detected"] is False and report["decision"]["decision"] == "keep"
    assert report["n_columns"] == 8 + len(load_reference(work.candidate).embedding_columns)
    column = report["columns"][0]
    assert {"column", "statistic", "p_value", "method", "drifted"} <= set(column)
    assert {c["method"] for c in report["columns"] if c["kind"] != "prediction"} == {"ks"}
    assert next(c for c in report["columns"] if c["column"] == "predicted_label")["method"] == "chisquare"
    assert report["confidence"]["now"] is not None and report["confidence"]["reference"] > 0
    assert report["classification"]["accuracy"] is not None, "labelled folder of known classes -> quality"
    page = result.html_path.read_text()
    assert "Lensmith drift: keep" in page
    assert "<script src=\"http" not in page, "self-contained: no script from a CDN"
    prom = (work.reports / "drift.prom").read_text()  # for a textfile collector: the alert rules read it
    assert "lensmith_drift_retrain 0" in prom and "lensmith_drift_drifted_share " in prom
    assert report["live_quality"]["corrections"] == 0 and report["live_quality"]["below_floor"] is False
    assert report["current"]["embedding_provider"] == "CPUExecutionProvider"  # drift.providers auto, no GPU here


def test_shifted_lighting_is_flagged_with_a_reason(work: Layout) -> None:
    write_shifted_copy(work.root / "data/raw/demo", work.root / "dark", 0.45)
    result = run_drift(drift_params(share_threshold=0.3), work, "dark")
    stats = {c["column"]: c for c in result.report["columns"]}
    assert stats["brightness"]["drifted"] and stats["brightness"]["p_value"] < 1e-3
    assert stats["brightness"]["current_mean"] < stats["brightness"]["reference_mean"]
    assert result.decision.retrain and "drifted share" in result.decision.reason


def test_ks_p_values_are_evidentlys_and_match_scipy(work: Layout) -> None:
    from scipy import stats

    from lensmith.imageio import load_image
    from lensmith.imagestats import image_stats

    dark = write_shifted_copy(work.root / "data/raw/demo", work.root / "dark", 0.8)
    report = run_drift(drift_params(), work, "dark").report
    ref = load_reference(work.candidate).comparison_rows()  # the training rows: the held-out ones calibrate
    current = [image_stats(load_image(f))["brightness"] for f in sorted(dark.rglob("*.jpg"))]
    expected = stats.ks_2samp(ref["brightness"], current)
    bright = next(c for c in report["columns"] if c["column"] == "brightness")
    assert bright["statistic"] == pytest.approx(expected.statistic)
    assert bright["p_value"] == pytest.approx(expected.pvalue, rel=1e-3, abs=1e-12)
    width = next(c for c in report["columns"] if c["column"] == "width")
    assert width["p_value"] == pytest.approx(1.0) and not width["drifted"], "identical constant columns never drift"


# ---- bad input ------------------------------------------------------------------------------------------


def test_empty_window_is_a_clear_error(work: Layout) -> None:
    (work.root / "empty").mkdir()
    with pytest.raises(DataError, match="empty window: no images"):
        run_drift(drift_params(), work, "empty")


def test_undecodable_images_are_quarantined_counted_and_not_fatal(work: Layout) -> None:
    folder = work.root / "mixed"
    shutil.copytree(work.root / "data/raw/demo/ok", folder / "ok")
    (folder / "ok" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "ok" / "empty.png").write_bytes(b"")
    result = run_drift(drift_params(), work, "mixed")
    assert result.report["current"]["n_quarantined"] == 2
    assert result.report["current"]["n_images"] == len(list((work.root / "data/raw/demo/ok").glob("*.jpg")))
    quarantine = pd.read_csv(result.report["current"]["quarantine"])
    assert set(quarantine["path"]) == {"ok/broken.jpg", "ok/empty.png"}


def test_all_images_broken_is_an_empty_window_naming_the_quarantine(work: Layout) -> None:
    (work.root / "bad" / "ok").mkdir(parents=True)
    (work.root / "bad" / "ok" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="all 1 file.*failed to decode.*drift_quarantine.csv"):
        run_drift(drift_params(), work, "bad")


def test_a_different_label_set_is_named_and_quality_skipped(work: Layout) -> None:
    shutil.copytree(work.root / "data/raw/demo/ok", work.root / "newlabels" / "dent")
    result = run_drift(drift_params(), work, "newlabels")
    assert result.report["labels"]["unknown"] == ["dent"]
    assert result.report["classification"] is None
    assert any("'dent'" in note and "not classes of the model" in note for note in result.report["notes"])


def test_unlabelled_flat_folder_is_accepted(work: Layout) -> None:
    flat = work.root / "flat"
    flat.mkdir()
    for file in sorted((work.root / "data/raw/demo/ok").glob("*.jpg")):
        shutil.copy(file, flat / file.name)
    result = run_drift(drift_params(), work, "flat")
    assert result.report["labels"] == {"present": False} and result.report["current"]["n_images"] > 0


def test_hostile_files_at_the_window_root_are_quarantined_not_read(work: Layout) -> None:
    """Root-level files get ingest's checks too: a symlink to /dev/zero and a FIFO neither hang nor read forever."""
    import os

    flat = work.root / "flat"
    flat.mkdir()
    for file in sorted((work.root / "data/raw/demo/ok").glob("*.jpg"))[:8]:
        shutil.copy(file, flat / file.name)
    (flat / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(flat / "pipe.png")
    result = run_drift(drift_params(), work, "flat")
    assert result.report["current"]["n_images"] == 8
    quarantine = pd.read_csv(result.report["current"]["quarantine"])
    assert set(quarantine["path"]) == {"zero.png", "pipe.png"}


def test_a_large_window_is_measured_on_a_seeded_sample_and_says_so(work: Layout) -> None:
    listed = len(list((work.root / "data/raw/demo").rglob("*.jpg")))
    first = run_drift(drift_params(max_window_images=20), work, "data/raw/demo").report
    again = run_drift(drift_params(max_window_images=20), work, "data/raw/demo").report
    assert first["current"]["n_images"] == 20 and first["current"]["n_in_window"] == listed > 20
    assert any(f"holds {listed} images" in n and "sample of 20" in n for n in first["notes"])
    assert [c["p_value"] for c in first["columns"]] == [c["p_value"] for c in again["columns"]], "seeded: same sample"
    whole = run_drift(drift_params(), work, "data/raw/demo").report
    assert whole["current"]["n_images"] == listed and not any("sample" in n for n in whole["notes"])


def test_missing_reference_says_how_to_build_it(work: Layout) -> None:
    (work.candidate / "drift_reference.parquet").unlink()
    with pytest.raises(DataError, match="no drift reference.*lensmith drift-reference"):
        run_drift(drift_params(), work, "data/raw/demo")


def test_registry_version_carries_its_reference_and_an_older_one_falls_back_to_the_candidates(work: Layout) -> None:
    from lensmith.registry import Registry

    registry = Registry(work.models)
    (work.reports / "metrics.json").write_text("{}")
    export_json = next(p for p in (work.models / "export" / "export.json", work.candidate / "export.json") if p.is_file())
    version = registry.register(work.candidate, metrics_path=work.reports / "metrics.json", gate_path=None, export_path=export_json)
    folder = registry.resolve(version)
    assert (folder / "drift_reference.parquet").read_bytes() == (work.candidate / "drift_reference.parquet").read_bytes()
    for name in ("drift_reference.parquet", "drift_reference.json"):  # a version registered before references existed
        (folder / name).unlink()
    result = run_drift(drift_params(), work, "data/raw/demo", model=version)
    assert result.report["model"]["version"] == load_reference(work.candidate).meta["model_version"]


# ---- the prediction log ------------------------------------------------------------------------------


def log_record(when: datetime, label: str, confidence: float, brightness: float, context: dict | None = None) -> dict:
    return {
        "id": f"{when.timestamp()}", "time": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "model_version": "v",
        "label": label, "confidence": confidence, "image_sha256": "ab", "width": 64, "height": 64,
        "brightness": brightness, "contrast": 20.0, "sharpness": 100.0, "mean_r": brightness, "mean_g": brightness, "mean_b": brightness,
        "context": context,
    }


def write_log(folder: Path, records: list[dict], torn_tail: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "predictions-20240101T000000Z-1-0001.jsonl").write_text(text + ('{"id": "half-writ' if torn_tail else ""))


def test_log_window_keeps_the_last_since_and_skips_a_torn_line(tmp_path: Path) -> None:
    now = datetime(2024, 5, 10, tzinfo=timezone.utc)
    write_log(tmp_path, [log_record(now - timedelta(days=d), "ok", 0.9, 100) for d in (1, 3, 8, 30)])
    window = load_log_window(tmp_path, "7d", now=now)
    assert window.n_images == 2 and window.kind == "log"
    assert any("unreadable log line" in n for n in window.notes)
    assert read_log_records(tmp_path, now - timedelta(days=365)).unreadable_lines == 1
    assert parse_duration("12h") == timedelta(hours=12)
    with pytest.raises(DataError, match="not a duration"):
        parse_duration("a week")


def test_a_long_log_window_is_sampled_with_a_seed(tmp_path: Path) -> None:
    now = datetime(2024, 5, 10, tzinfo=timezone.utc)
    write_log(tmp_path, [log_record(now - timedelta(minutes=m), "ok", 0.9, float(m)) for m in range(1, 51)], torn_tail=False)
    sampled = load_log_window(tmp_path, "7d", now=now, max_images=10, seed=3)
    assert sampled.n_images == 10 and sampled.n_in_window == 50
    assert sampled.frame["brightness"].tolist() == load_log_window(tmp_path, "7d", now=now, max_images=10, seed=3).frame["brightness"].tolist()
    assert any("sample of 10" in n for n in sampled.notes)
    assert load_log_window(tmp_path, "7d", now=now, max_images=100).n_images == 50


def mixed_site_log(folder: Path, now: datetime) -> None:
    """Site A and site B at the lighting of the reference, site C darker; two old records without context."""
    sites = [("A", 100.0), ("B", 100.0), ("C", 40.0)]
    records = []
    for i in range(60):
        site, brightness = sites[i % 3]
        records.append(log_record(now - timedelta(minutes=10 + i), "ok", 0.9, brightness + i % 7, {"site": site, "line": str(i % 2)}))
    records += [log_record(now - timedelta(hours=2), "ok", 0.9, 100.0), log_record(now - timedelta(hours=3), "ok", 0.9, 100.0)]
    write_log(folder, records, torn_tail=False)


def test_log_window_is_cut_by_the_records_context_and_carries_it(tmp_path: Path) -> None:
    now = datetime(2024, 5, 10, tzinfo=timezone.utc)
    mixed_site_log(tmp_path, now)
    window = load_log_window(tmp_path, "7d", now=now, where=parse_where(["site=C,B", "line=1"]))
    assert window.n_images == 20 and set(window.frame["site"]) == {"B", "C"} and set(window.frame["line"]) == {"1"}
    assert window.where == ["site=C,B", "line=1"] and window.n_before_where == 62
    assert "where site=C,B line=1" in window.description and any("20 of 62" in n for n in window.notes)
    everything = load_log_window(tmp_path, "7d", now=now)
    assert everything.n_images == 62 and everything.frame["site"].isna().sum() == 2 and everything.n_before_where is None
    with pytest.raises(WindowFilterError, match=r"--where plant=x: unknown column 'plant'.*\['line', 'site'\]"):
        load_log_window(tmp_path, "7d", now=now, where=parse_where(["plant=x"]))
    with pytest.raises(WindowFilterError, match=r"empty window after --where site=Z: none of its 62 images match .*'A': 20"):
        load_log_window(tmp_path, "7d", now=now, where=parse_where(["site=Z"]))
    for bad in (["site"], ["site="], ["=C"], ["site=C,"], ["site=C", "site=D"]):
        with pytest.raises(DataError, match="--where"):
            parse_where(bad)


def test_cli_drift_where_on_a_prediction_log_with_mixed_sites(work: Layout) -> None:
    from lensmith.cli import app

    mixed_site_log(work.root / "serving/predictions", datetime.now(timezone.utc))
    params_file = work.root / "params.yaml"
    params_file.write_text(json.dumps(drift_params().model_dump(mode="json")))
    base = ["drift", "--current", "log", "--since", "1d", "--params", str(params_file), "--root", str(work.root)]
    runner = CliRunner()
    ok = runner.invoke(app, [*base, "--where", "site=C"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((work.reports / "drift.json").read_text())
    assert report["current"]["where"] == ["site=C"] and report["current"]["n_images"] == 20 and report["current"]["n_before_where"] == 62
    assert "where site=C" in ok.output and "where site=C" in (work.reports / "drift.html").read_text()
    unknown = runner.invoke(app, [*base, "--where", "plant=x"])
    assert unknown.exit_code == 1 and "unknown column 'plant'" in unknown.output
    empty = runner.invoke(app, [*base, "--where", "site=Z"])
    assert empty.exit_code == 1 and "empty window after --where site=Z" in empty.output


def test_a_folder_window_is_cut_by_its_metadata_csv_column(work: Layout) -> None:
    metadata = pd.read_csv(work.root / "data/raw/demo/metadata.csv")
    site = str(metadata["site"].iloc[0])
    result = run_drift(drift_params(where=[f"site={site}"]), work, "data/raw/demo")
    assert result.report["current"]["where"] == [f"site={site}"]
    assert result.report["current"]["n_images"] == (metadata["site"] == site).sum() < len(metadata)
    with pytest.raises(WindowFilterError, match="unknown column 'plant'.*'lighting'"):
        run_drift(drift_params(), work, "data/raw/demo", where=["plant=x"])


def test_log_window_confidence_drop_triggers_retrain(work: Layout) -> None:
    ref = load_reference(work.candidate)
    brightness = ref.frame["brightness"].sample(60, replace=True, random_state=0).to_numpy()
    now = datetime.now(timezone.utc)
    low = ref.mean_confidence * 0.8
    write_log(work.root / "serving/predictions", [log_record(now - timedelta(hours=1), ref.classes[0], low, float(b)) for b in brightness])
    result = run_drift(drift_params(), work, "log", since="1d")
    assert result.report["current"]["kind"] == "log"
    assert result.report["current"]["embedding_provider"] is None  # the log carries the served model's predictions
    assert not any(c["kind"] == "embedding" for c in result.report["columns"])
    assert result.report["confidence"]["relative_drop"] == pytest.approx(0.2, abs=1e-6)
    assert result.decision.retrain and "mean confidence fell" in result.decision.reason


def test_empty_log_window_is_a_clear_error(work: Layout) -> None:
    write_log(work.root / "serving/predictions", [log_record(datetime(2020, 1, 1, tzinfo=timezone.utc), "ok", 0.9, 100)])
    with pytest.raises(DataError, match="empty window"):
        run_drift(drift_params(), work, "log", since="7d")


# ---- trigger ---------------------------------------------------------------------------------------------


def test_trigger_rules() -> None:
    dp = DriftParams(share_threshold=0.5, confidence_drop=0.05, min_window=30)  # explicit: the rule, not the default
    assert decide(0.5, 0.9, 0.9, 100, dp).retrain
    assert not decide(0.49, 0.9, 0.9, 100, dp).retrain
    assert decide(0.0, 0.855, 0.9, 100, dp).retrain, "exactly 5% relative drop triggers"
    assert not decide(0.0, 0.86, 0.9, 100, dp).retrain
    assert not decide(1.0, 0.1, 0.9, 10, dp).retrain, "a window below min_window never triggers"
    both = decide(0.9, 0.5, 0.9, 100, dp)
    assert len(both.reasons) == 2 and both.to_dict()["decision"] == "retrain"


def test_cli_drift_prints_the_decision_and_fails_clearly_without_reference(work: Layout) -> None:
    from lensmith.cli import app

    params_file = work.root / "params.yaml"
    params_file.write_text(json.dumps(drift_params().model_dump(mode="json")))
    runner = CliRunner()
    ok = runner.invoke(app, ["drift", "--current", "data/raw/demo", "--params", str(params_file), "--root", str(work.root)])
    assert ok.exit_code == 0, ok.output
    assert "decision: keep" in ok.output
    (work.candidate / "drift_reference.json").unlink()
    bad = runner.invoke(app, ["drift", "--current", "data/raw/demo", "--params", str(params_file), "--root", str(work.root)])
    assert bad.exit_code == 1 and "no drift reference" in bad.output


def test_monitoring_code_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import lensmith.drift.report, lensmith.drift.reference, lensmith.drift.current, lensmith.drift.embeddings\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
