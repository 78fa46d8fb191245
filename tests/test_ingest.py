"""Ingest from a folder and a CSV manifest: manifest contents, metadata join, incremental reuse, CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_test_image
from PIL import Image
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import DataError
from lensmith.ingest import run_ingest
from lensmith.schema import MANIFEST_COLUMNS
from lensmith.imagestats import image_stats, perceptual_hash, phash_distance
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.sources import resolve_local_files


def params_for(source: Path | str, **data: object) -> Params:
    params = Params()
    params.data.source = str(source)
    params.data.workers = 1
    for key, value in data.items():
        setattr(params.data, key, value)
    return params


def read_manifest(layout: Layout) -> pd.DataFrame:
    return pd.read_parquet(layout.manifest)


def test_folder_ingest_writes_sorted_manifest_with_stats_and_metadata(tiny_image_folder: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params_for(tiny_image_folder), layout)

    manifest = read_manifest(layout)
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert {"site", "lighting", "camera", "batch"} <= set(manifest.columns)
    assert len(manifest) == 12 and summary.per_class == {"crack": 6, "ok": 6}
    assert manifest["path"].tolist() == sorted(manifest["path"])
    row = manifest.set_index("path").loc["ok/ok_00.png"]
    assert row["label"] == "ok" and row["format"] == "PNG" and row["mode"] == "RGB" and row["channels"] == 3
    assert (row["width"], row["height"]) == (48, 40)
    assert row["site"] == "A" and row["lighting"] == "dim" and row["batch"] == "ok-0"
    assert Path(row["file"]) == tiny_image_folder / "ok" / "ok_00.png"  # outside the project: absolute
    assert manifest["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert manifest["sha256"].str.len().eq(64).all() and manifest["sha256"].is_unique
    assert manifest["brightness"].between(1, 254).all() and (manifest["sharpness"] > 0).all()
    assert (manifest["file_bytes"] == [os.path.getsize(f) for f in manifest["file"]]).all()
    assert set(manifest["format"]) == {"PNG", "JPEG"}
    assert pd.read_csv(layout.quarantine).empty
    text = str(summary)
    assert "read 12, reused 0, quarantined 0" in text and "crack 6, ok 6" in text and "images/s" in text


def test_relative_source_resolves_against_project_root_and_file_column_is_relative(
    tiny_image_folder: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(tiny_image_folder, project / "data" / "raw" / "demo")
    layout = Layout(project)
    run_ingest(params_for("data/raw/demo"), layout)
    files = read_manifest(layout)["file"]
    assert files.iloc[0] == "data/raw/demo/crack/crack_00.png"
    assert resolve_local_files(read_manifest(layout), params_for("data/raw/demo"), layout)[0] == (
        project / "data/raw/demo/crack/crack_00.png"
    )


def test_second_run_reuses_unchanged_files_without_reading_them(tiny_image_folder: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    params = params_for(tiny_image_folder)
    run_ingest(params, layout)
    before = read_manifest(layout).set_index("path")

    # Same size and mtime but different bytes: only a re-read could notice, so the old hash proves no re-read.
    sneaky = tiny_image_folder / "ok" / "ok_00.png"
    st = sneaky.stat()
    data = bytearray(sneaky.read_bytes())
    data[-20] ^= 0xFF
    sneaky.write_bytes(bytes(data))
    os.utime(sneaky, ns=(st.st_atime_ns, st.st_mtime_ns))
    # A genuinely changed file (new content, new mtime) must be re-read.
    changed = tiny_image_folder / "crack" / "crack_01.jpg"
    write_test_image(changed, seed=999, size=(50, 50))

    summary = run_ingest(params, layout)
    after = read_manifest(layout).set_index("path")
    assert (summary.n_read, summary.n_reused) == (1, 11)
    assert after.loc["ok/ok_00.png", "sha256"] == before.loc["ok/ok_00.png", "sha256"]
    assert after.loc["crack/crack_01.jpg", "sha256"] != before.loc["crack/crack_01.jpg", "sha256"]
    assert after.loc["crack/crack_01.jpg", "width"] == 50
    pd.testing.assert_frame_equal(after.drop(index="crack/crack_01.jpg"), before.drop(index="crack/crack_01.jpg"))


def test_metadata_change_is_picked_up_on_reuse(tiny_image_folder: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    params = params_for(tiny_image_folder)
    run_ingest(params, layout)
    meta = pd.read_csv(tiny_image_folder / "metadata.csv")
    meta.loc[meta["path"] == "ok/ok_00.png", "site"] = "C"
    meta.to_csv(tiny_image_folder / "metadata.csv", index=False)
    summary = run_ingest(params, layout)
    assert summary.n_reused == 12
    assert read_manifest(layout).set_index("path").loc["ok/ok_00.png", "site"] == "C"


def test_parallel_ingest_matches_single_process(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for i in range(40):
        write_test_image(root / ("a" if i % 2 else "b") / f"img_{i:03d}.png", seed=i, size=(32, 32))
    single, parallel = Layout(tmp_path / "one"), Layout(tmp_path / "two")
    run_ingest(params_for(root, workers=1), single)
    summary = run_ingest(params_for(root, workers=2), parallel)
    assert summary.n_read == 40
    pd.testing.assert_frame_equal(read_manifest(single), read_manifest(parallel))


def test_csv_manifest_source_with_metadata_columns(tmp_path: Path) -> None:
    images = tmp_path / "shoot"
    write_test_image(images / "day1" / "x.png", seed=1)
    write_test_image(images / "day1" / "y.png", seed=2)
    write_test_image(images / "z.JPG", seed=3, fmt="JPEG")
    write_test_image(images / "day2" / "w.png", seed=4)
    (images / "labels.csv").write_text(
        "path,label,site,operator\nday1/x.png,ok,A,kim\n./day1/y.png,crack,B,lee\nz.JPG,ok,A,\nday2\\w.png,ok,B,kim\n",
        encoding="utf-8",
    )
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params_for(images / "labels.csv"), layout)
    manifest = read_manifest(layout).set_index("path")
    assert summary.per_class == {"crack": 1, "ok": 3}
    assert manifest.index.tolist() == ["day1/x.png", "day1/y.png", "day2/w.png", "z.JPG"]
    assert manifest.loc["day1/y.png", "label"] == "crack" and manifest.loc["day1/y.png", "operator"] == "lee"
    assert pd.isna(manifest.loc["z.JPG", "operator"]) and manifest.loc["z.JPG", "format"] == "JPEG"


def test_hidden_files_and_other_extensions_are_ignored(tiny_image_folder: Path, tmp_path: Path) -> None:
    write_test_image(tiny_image_folder / "ok" / ".hidden.png", seed=5)
    write_test_image(tiny_image_folder / ".thumbs" / "t.png", seed=6)
    write_test_image(tiny_image_folder / "ok" / "UPPER.PNG", seed=7, fmt="PNG")
    (tiny_image_folder / "ok" / "notes.txt").write_text("not an image")
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params_for(tiny_image_folder), layout)
    paths = read_manifest(layout)["path"].tolist()
    assert "ok/UPPER.PNG" in paths and len(paths) == 13
    assert summary.n_quarantined == 0


def test_previous_manifest_survives_a_failed_run(tiny_image_folder: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    run_ingest(params_for(tiny_image_folder), layout)
    before = layout.manifest.read_bytes()
    for i in range(4):
        (tiny_image_folder / "ok" / f"broken_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(DataError, match=r"4 of 16 files \(25.0%\).*max_bad_fraction=5.0%.*not_an_image 4.*quarantine.csv"):
        run_ingest(params_for(tiny_image_folder), layout)
    assert layout.manifest.read_bytes() == before
    assert len(pd.read_csv(layout.quarantine)) == 4


def test_resolve_local_files_reports_a_missing_local_file(tiny_image_folder: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    params = params_for(tiny_image_folder)
    run_ingest(params, layout)
    manifest = read_manifest(layout)
    assert all(p.is_file() for p in resolve_local_files(manifest, params, layout))
    (tiny_image_folder / "ok" / "ok_03.jpg").unlink()
    with pytest.raises(DataError, match="ok/ok_03.jpg.*missing"):
        resolve_local_files(manifest, params, layout)


def test_cli_ingest_prints_summary_and_bad_source_is_one_line(tiny_image_folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    project = tmp_path / "project"
    project.mkdir()
    ok = runner.invoke(app, ["ingest", "--root", str(project), "--params", str(project / "params.yaml"),
                             "--set", f"data.source={tiny_image_folder}"])
    assert ok.exit_code == 0, ok.output
    assert "read 12, reused 0, quarantined 0" in ok.output
    bad = runner.invoke(app, ["ingest", "--root", str(project), "--params", str(project / "params.yaml"),
                              "--set", "data.source=nowhere/at/all"])
    assert bad.exit_code == 1
    assert "does not exist" in bad.output and "Traceback" not in bad.output


def test_image_stats_on_known_images() -> None:
    flat = Image.new("L", (16, 16), 100)
    assert image_stats(flat) == pytest.approx(
        {"brightness": 100, "contrast": 0, "sharpness": 0, "mean_r": 100, "mean_g": 100, "mean_b": 100}
    )
    checker = Image.fromarray((np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8), "L")
    stats = image_stats(checker)
    assert stats["brightness"] == pytest.approx(127.5) and stats["contrast"] == pytest.approx(127.5)
    assert stats["sharpness"] == pytest.approx(1020**2)  # every interior Laplacian is +-4*255
    red = image_stats(Image.new("RGB", (8, 8), (200, 10, 0)))
    assert (red["mean_r"], red["mean_g"], red["mean_b"]) == (200, 10, 0)


def test_perceptual_hash_is_stable_under_small_changes() -> None:
    from skimage import data as skdata

    base = np.asarray(Image.fromarray(skdata.camera()).resize((128, 128)), dtype=np.float64)
    noisy = np.clip(base * 1.05 + np.random.default_rng(0).normal(0, 3, base.shape), 0, 255)
    a, b = (Image.fromarray(x.astype(np.uint8), "L") for x in (base, noisy))
    c = Image.fromarray(np.asarray(Image.fromarray(skdata.brick()).resize((128, 128))), "L")
    assert len(perceptual_hash(a)) == 16
    assert phash_distance(perceptual_hash(a), perceptual_hash(b)) <= 4
    assert phash_distance(perceptual_hash(a), perceptual_hash(c)) > 16
