"""The embedded demo dataset: determinism, layout, metadata, site drift, visible defects, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lensmith import demodata
from lensmith.cli import app
from lensmith.demodata import (
    CLASSES,
    DEFECTS,
    METADATA_COLUMNS,
    ImageJob,
    batch_sizes,
    generate_demo_dataset,
    plan_jobs,
    render_image,
)
from lensmith.errors import DataError


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def generate(out: Path, **kwargs) -> demodata.DemoSummary:
    options = {"sites": None, "seed": 0, "per_class": 6, "image_size": 128, "workers": 1} | kwargs
    return generate_demo_dataset(out, **options)


def mean_stats(out: Path) -> tuple[float, float]:
    """Mean luminance and mean red/blue ratio over every image under `out`."""
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in sorted(out.rglob("*.jpg"))])
    return float(pixels.mean()), float((pixels[..., 0].mean(axis=(1, 2)) / pixels[..., 2].mean(axis=(1, 2))).mean())


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    generate(tmp_path / "one", workers=1)
    generate(tmp_path / "two", workers=2)
    first, second = tree_digest(tmp_path / "one"), tree_digest(tmp_path / "two")
    assert len(first) == 5 * 6 + 1
    assert first == second


def test_different_seed_gives_different_images(tmp_path):
    generate(tmp_path / "s0", seed=0)
    generate(tmp_path / "s1", seed=1)
    a, b = tree_digest(tmp_path / "s0"), tree_digest(tmp_path / "s1")
    assert a.keys() == b.keys()
    differing = [name for name in a if name.endswith(".jpg") and a[name] != b[name]]
    assert len(differing) == 30


def test_layout_counts_and_metadata(tmp_path):
    out = tmp_path / "demo"
    summary = generate(out, per_class=7)
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns) == list(METADATA_COLUMNS)
    assert summary.counts == {label: 7 for label in CLASSES}
    assert meta["label"].value_counts().to_dict() == {label: 7 for label in CLASSES}
    assert meta["site"].value_counts().to_dict() == {"A": 20, "B": 15}  # 4 + 3 per class
    assert meta.notna().all().all()
    for row in meta.itertuples():
        assert row.path == f"{row.label}/{Path(row.path).name}"  # ImageFolder: <class>/<file>, POSIX
        with Image.open(out / row.path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (128, 128))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == sorted(meta["path"])
    assert meta.groupby("batch")["label"].nunique().max() == 1  # a batch is one physical tile of one class
    assert meta.groupby("batch")["site"].nunique().max() == 1
    assert set(meta["lighting"]) <= set(demodata.LIGHTING_GAINS)
    assert set(meta["camera"]) <= set(demodata.CAMERAS)
    assert "demo data: 35 images" in str(summary) and str(out) in str(summary)


@pytest.mark.parametrize("n_images", [1, 4, 5, 11, 57, 250, 500])
def test_batches_hold_five_to_ten_images(n_images):
    sizes = batch_sizes(0, "A", "crack", n_images)
    assert sum(sizes) == n_images
    if n_images >= 5:
        assert min(sizes) >= 5
        assert max(sizes) <= 14  # a short tail batch is folded into the one before it
        assert np.mean(sizes) <= 10


def test_default_scale_plan_has_realistic_groups():
    jobs = plan_jobs(0, ["A", "B"], 500)
    assert len(jobs) == 2500
    per_batch = pd.Series([(j.site, j.label, j.batch) for j in jobs]).value_counts()
    assert 250 <= len(per_batch) <= 500
    assert per_batch.median() >= 5


def test_site_c_is_darker_warmer_and_not_a_training_site(tmp_path):
    generate(tmp_path / "ab", per_class=10)
    generate(tmp_path / "c", per_class=10, sites=["c"])
    meta = pd.read_csv(tmp_path / "c" / "metadata.csv")
    assert set(meta["site"]) == {"C"}
    assert set(pd.read_csv(tmp_path / "ab" / "metadata.csv")["site"]) == {"A", "B"}
    ab_lum, ab_warmth = mean_stats(tmp_path / "ab")
    c_lum, c_warmth = mean_stats(tmp_path / "c")
    assert c_lum < ab_lum - 10
    assert c_warmth > ab_warmth + 0.4


def flat_surface(size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), 0.6, dtype=np.float32)


@pytest.mark.parametrize("label", sorted(DEFECTS))
def test_every_defect_marks_a_visible_local_region(label):
    for seed in range(20):
        refl, spec = flat_surface(), np.zeros((128, 128), dtype=np.float32)
        DEFECTS[label](refl, spec, np.random.default_rng(seed), 1.0)
        changed = (np.abs(refl - 0.6).max(axis=-1) > 0.1) | (spec > 0.1)
        assert 15 <= changed.sum() <= 0.35 * changed.size, (label, seed, changed.sum())


def test_defect_signatures_differ():
    rng = np.random.default_rng
    refl, spec = flat_surface(), np.zeros((128, 128), dtype=np.float32)
    demodata.draw_scratch(refl, spec, rng(0), 1.0)
    assert (spec > 0.2).sum() > 40  # a specular ridge beside the dark core
    refl, spec = flat_surface(), np.zeros((128, 128), dtype=np.float32)
    demodata.draw_crack(refl, spec, rng(0), 1.0)
    assert spec.max() == 0 and refl.min() < 0.25  # dark, no highlight
    refl, spec = flat_surface(), np.zeros((128, 128), dtype=np.float32)
    demodata.draw_pitting(refl, spec, rng(0), 1.0)
    assert refl.min() < 0.2 and (spec > 0.2).sum() > 10  # dark pits with bright rims
    stained = 0
    for seed in range(10):
        refl = flat_surface()
        demodata.draw_stain(refl, np.zeros((128, 128), dtype=np.float32), rng(seed), 1.0)
        stained += (np.abs(refl - 0.6).max(axis=-1) > 0.1).sum() > 300  # a broad blob, not a line
    assert stained >= 9


def test_ok_images_differ_from_defect_images_only_locally():
    """The label must not be readable from global brightness: ok and defect images overlap in mean."""
    means = {
        label: [render_image(ImageJob("A", label, i, i // 6), 0, 128)[0].mean() for i in range(24)]
        for label in CLASSES
    }
    ok_low, ok_high = np.percentile(means["ok"], [10, 90])
    for label in DEFECTS:
        assert ok_low < np.median(means[label]) < ok_high, label


def test_existing_output_survives_a_failed_run(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    calls = {"n": 0}

    def failing_encoder(pixels: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full")
        return b"x"

    monkeypatch.setattr(demodata, "jpeg_bytes", failing_encoder)
    with pytest.raises(OSError, match="disk full"):
        generate(out)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp dir left behind
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="unknown demo site"):
        generate(tmp_path / "x", sites=["D"])
    with pytest.raises(DataError, match="per_class"):
        generate(tmp_path / "x", per_class=0)


def test_cli_writes_the_training_sites_and_site_c_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["demo-data", "--per-class", "3", "--seed", "5"])
    assert result.exit_code == 0, result.output
    default = tmp_path / "data" / "raw" / "demo"
    assert set(pd.read_csv(default / "metadata.csv")["site"]) == {"A", "B"}
    result = runner.invoke(app, ["demo-data", "--per-class", "3", "--site", "C"])
    assert result.exit_code == 0, result.output
    site_c = tmp_path / "data" / "raw" / "demo_site_c"
    assert set(pd.read_csv(site_c / "metadata.csv")["site"]) == {"C"}
    assert "15 images" in result.output
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path / "custom"), "--per-class", "2", "--site", "B"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "custom").rglob("*.jpg"))) == 10


def test_cli_rejects_an_unknown_site_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo-data", "--per-class", "2", "--site", "Q"])
    assert result.exit_code == 1
    assert "unknown demo site" in result.output
    assert "Traceback" not in result.output
