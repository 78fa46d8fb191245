"""The split stage: fractions, group integrity, duplicates, stability, determinism, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import DataError
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.neardup import near_duplicate_groups
from lensmith.params import Params
from lensmith.split import SplitSummary, run_split, split_manifest

CLASSES = ("ok", "crack", "scratch", "stain", "pitting")


def synthetic_manifest(
    per_class: dict[str, int] | int,
    group_sizes: tuple[int, int] = (5, 10),
    seed: int = 0,
    prefix: str = "",
) -> pd.DataFrame:
    """Manifest rows like ingest writes them: batches of `group_sizes` images within one class."""
    rng = np.random.default_rng(seed)
    wanted = per_class if isinstance(per_class, dict) else {label: per_class for label in CLASSES}
    rows = []
    for label, n in wanted.items():
        made, batch = 0, 0
        while made < n:
            size = min(int(rng.integers(group_sizes[0], group_sizes[1] + 1)), n - made)
            for i in range(size):
                path = f"{label}/{prefix}{label}_b{batch:04d}_{i}.jpg"
                batch_id = f"{prefix}{label}-{batch}"
                rows.append({"path": path, "file": f"/data/{path}", "label": label, "batch": batch_id})
            made, batch = made + size, batch + 1
    frame = pd.DataFrame(rows)
    frame["sha256"] = [f"{prefix}{i:060x}" for i in range(len(frame))]
    frame["phash"] = [f"{int(v):016x}" for v in rng.integers(0, 2**63, len(frame), dtype=np.int64)]
    frame["site"] = rng.choice(["A", "B"], len(frame))
    return frame


def params(**split: object) -> Params:
    return Params.model_validate({"split": split, "validate": {"near_duplicate_distance": 4}})


def layout_with(tmp_path: Path, manifest: pd.DataFrame) -> Layout:
    layout = Layout(tmp_path)
    layout.data.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(layout.manifest, index=False)
    return layout


def read_splits(layout: Layout) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(layout.split_file(name)) for name in SPLIT_NAMES], ignore_index=True)


def assignment(layout: Layout) -> pd.Series:
    frame = read_splits(layout)
    return frame.set_index("path")["split"].sort_index()


def assert_fractions_within(summary: SplitSummary, tolerance: float, min_images: int = 50) -> None:
    fractions = summary.fractions()
    for label, per_split in summary.counts.items():
        if sum(per_split.values()) < min_images:
            continue
        for name, target in summary.targets.items():
            assert abs(fractions[label][name] - target) <= tolerance, (label, name, fractions[label][name])


@pytest.mark.parametrize(
    ("per_class", "group_sizes"),
    [(50, (1, 3)), (60, (1, 4)), (120, (2, 5)), (300, (3, 8)), (500, (5, 10))],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fractions_within_two_points_per_class(per_class, group_sizes, seed):
    manifest = synthetic_manifest(per_class, group_sizes, seed=seed)
    _, summary = split_manifest(manifest, params(seed=seed))
    assert_fractions_within(summary, 0.02)


def test_fractions_follow_custom_targets_and_uneven_classes():
    manifest = synthetic_manifest({"ok": 900, "crack": 240, "scratch": 75, "stain": 55, "pitting": 400}, (2, 8))
    _, summary = split_manifest(manifest, params(train=0.8, val=0.1, test=0.1))
    assert_fractions_within(summary, 0.02)
    assert summary.targets == {"train": 0.8, "val": 0.1, "test": 0.1}


def test_writes_three_files_with_every_manifest_column_and_groups_intact(tmp_path):
    manifest = synthetic_manifest(80, (3, 9))
    layout = layout_with(tmp_path, manifest)
    summary = run_split(params(), layout)
    frames = {name: pd.read_parquet(layout.split_file(name)) for name in SPLIT_NAMES}
    for name, frame in frames.items():
        assert list(frame.columns) == [*manifest.columns, "split", "group"]
        assert (frame["split"] == name).all()
        assert frame["path"].is_monotonic_increasing
    combined = pd.concat(frames.values(), ignore_index=True)
    assert sorted(combined["path"]) == sorted(manifest["path"])
    assert combined.groupby("batch")["split"].nunique().max() == 1
    assert combined.groupby("group")["split"].nunique().max() == 1
    assert (combined["group"] == "batch=" + combined["batch"]).all()
    assert summary.n_images == len(manifest) and summary.n_new == len(manifest) and summary.n_kept == 0
    assert summary.files == {name: layout.split_file(name) for name in SPLIT_NAMES}
    text = str(summary)
    assert "train (70%)" in text and f"{len(manifest)} images" in text
    assert not list(layout.splits_dir.glob(".*"))  # no temp files left


def near_copy(phash: str, bits: int) -> str:
    value = int(phash, 16)
    for bit in range(bits):
        value ^= 1 << (bit * 7)
    return f"{value:016x}"


def test_duplicates_and_near_duplicates_never_straddle_splits():
    manifest = synthetic_manifest(100, (1, 1), seed=3)  # every image its own batch
    rng = np.random.default_rng(0)
    sources = rng.choice(len(manifest), 60, replace=False)
    for k, (a, b) in enumerate(zip(sources[:30], sources[30:])):
        if k % 2:
            manifest.loc[b, "phash"] = near_copy(manifest.loc[a, "phash"], 3)  # near-duplicate
        else:
            manifest.loc[b, "sha256"] = manifest.loc[a, "sha256"]  # exact duplicate
    for group_column in ("batch", None):
        frames, summary = split_manifest(manifest, params(group_column=group_column))
        combined = pd.concat(frames.values(), ignore_index=True)
        clusters = near_duplicate_groups(combined["phash"].tolist(), 4)
        assert combined.groupby(clusters)["split"].nunique().max() == 1
        assert combined.groupby("sha256")["split"].nunique().max() == 1
        assert summary.n_groups == len(manifest) - 30


def test_group_column_null_uses_one_group_per_image_plus_duplicates():
    manifest = synthetic_manifest(60, (6, 6))
    frames, summary = split_manifest(manifest, params(group_column=None))
    combined = pd.concat(frames.values())
    assert summary.n_groups == len(manifest)
    assert combined["group"].str.startswith("path=").all()
    assert combined.groupby("batch")["split"].nunique().max() > 1  # batches are free to straddle now
    assert_fractions_within(summary, 0.02)


def test_adding_images_never_moves_existing_ones(tmp_path):
    first = synthetic_manifest(200, (3, 9), seed=1)
    layout = layout_with(tmp_path, first)
    run_split(params(), layout)
    before = assignment(layout)

    new = synthetic_manifest(60, (3, 9), seed=2, prefix="n")
    joiners = first.groupby("batch").head(1).head(40).copy()  # new shots of existing batches
    joiners["path"] = "late/" + joiners["path"]
    joiners["sha256"] = [f"late{i:060x}" for i in range(len(joiners))]
    joiners["phash"] = [f"{int(v):016x}" for v in np.random.default_rng(9).integers(0, 2**63, len(joiners))]
    grown = pd.concat([first, new, joiners], ignore_index=True)
    grown.to_parquet(layout.manifest, index=False)
    summary = run_split(params(), layout)
    after = assignment(layout)

    assert after.loc[before.index].equals(before)
    assert summary.n_kept == len(first) and summary.n_new == len(new) + len(joiners)
    combined = read_splits(layout)
    assert combined.groupby("batch")["split"].nunique().max() == 1  # joiners followed their batch
    assert_fractions_within(summary, 0.02)
    assert not summary.warnings


def test_removed_images_are_dropped_and_the_rest_stay(tmp_path):
    first = synthetic_manifest(100, (2, 6))
    layout = layout_with(tmp_path, first)
    run_split(params(), layout)
    before = assignment(layout)
    shrunk = first.iloc[20:]
    shrunk.to_parquet(layout.manifest, index=False)
    summary = run_split(params(), layout)
    assert summary.n_dropped == 20 and summary.n_new == 0
    assert assignment(layout).equals(before.loc[sorted(shrunk["path"])])


def test_a_new_image_bridging_two_splits_joins_the_larger_part_with_a_warning(tmp_path):
    manifest = synthetic_manifest(100, (1, 1))
    layout = layout_with(tmp_path, manifest)
    run_split(params(), layout)
    current = assignment(layout)
    train_paths = current[current == "train"].index[:2]
    test_path = current[current == "test"].index[0]
    bridge = manifest[manifest["path"] == train_paths[0]].copy()
    bridge["path"], bridge["sha256"] = "crack/bridge.jpg", "bridge"
    bridge["phash"] = near_copy(bridge["phash"].iloc[0], 2)
    grown = manifest.copy()
    # an existing train image, an existing train image's batch and an existing test image, all one group now
    grown.loc[grown["path"] == test_path, "batch"] = grown.loc[grown["path"] == train_paths[0], "batch"].iloc[0]
    grown.loc[grown["path"] == train_paths[1], "batch"] = grown.loc[grown["path"] == train_paths[0], "batch"].iloc[0]
    pd.concat([grown, bridge], ignore_index=True).to_parquet(layout.manifest, index=False)

    summary = run_split(params(), layout)
    after = assignment(layout)
    assert after.drop("crack/bridge.jpg").equals(current)
    assert after["crack/bridge.jpg"] == "train"
    assert len(summary.warnings) == 1 and "train, test" in summary.warnings[0]
    assert "warning:" in str(summary)


def test_same_inputs_same_split_and_the_seed_matters(tmp_path):
    manifest = synthetic_manifest(100, (2, 6))
    a = layout_with(tmp_path / "a", manifest)
    b = layout_with(tmp_path / "b", manifest.sample(frac=1.0, random_state=0))  # row order must not matter
    c = layout_with(tmp_path / "c", manifest)
    run_split(params(seed=0), a)
    run_split(params(seed=0), b)
    run_split(params(seed=1), c)
    for name in SPLIT_NAMES:
        left, right = pd.read_parquet(a.split_file(name)), pd.read_parquet(b.split_file(name))
        pd.testing.assert_frame_equal(left, right[left.columns])
    assert not assignment(a).equals(assignment(c))


def test_small_class_error_names_the_class_and_count(tmp_path):
    manifest = synthetic_manifest({"ok": 100, "crack": 100, "rare": 4}, (1, 3))
    layout = layout_with(tmp_path, manifest)
    with pytest.raises(DataError, match=r"'rare' \(4 images\).*min_class_size is 10"):
        run_split(params(min_class_size=10, on_small_class="error"), layout)
    assert not layout.splits_dir.exists()


def test_small_class_warn_puts_it_in_train(tmp_path):
    manifest = synthetic_manifest({"ok": 100, "crack": 100, "rare": 4}, (1, 3))
    summary = run_split(params(min_class_size=10, on_small_class="warn"), layout_with(tmp_path, manifest))
    assert summary.counts["rare"] == {"train": 4, "val": 0, "test": 0}
    assert any("'rare' (4 images)" in w for w in summary.warnings)
    assert_fractions_within(summary, 0.02)


def test_zero_val_fraction_leaves_val_empty(tmp_path):
    layout = layout_with(tmp_path, synthetic_manifest(60, (1, 3)))
    summary = run_split(params(train=0.8, val=0.0, test=0.2), layout)
    assert summary.split_counts["val"] == 0
    assert pd.read_parquet(layout.split_file("val")).empty
    assert_fractions_within(summary, 0.02)


def test_missing_or_empty_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no manifest at .*lensmith ingest"):
        run_split(params(), Layout(tmp_path))
    empty = synthetic_manifest(10).iloc[:0]
    with pytest.raises(DataError, match="no images"):
        run_split(params(), layout_with(tmp_path, empty))


def test_missing_group_column_names_it_and_the_available_columns(tmp_path):
    layout = layout_with(tmp_path, synthetic_manifest(20).drop(columns=["batch"]))
    with pytest.raises(DataError, match=r"'batch' is not a manifest column; available: path, file, label"):
        run_split(params(group_column="batch"), layout)


def test_cli_split_prints_the_table_and_reports_bad_input_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["split", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "no manifest" in result.output and "Traceback" not in result.output
    layout_with(tmp_path, synthetic_manifest(60, (2, 5)))
    result = runner.invoke(app, ["split", "--root", str(tmp_path), "--set", "split.seed=3"])
    assert result.exit_code == 0, result.output
    assert "train (70%)" in result.output and "pitting" in result.output
    assert all(Layout(tmp_path).split_file(name).exists() for name in SPLIT_NAMES)
