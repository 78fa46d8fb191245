"""Drift that a plant can trust (issue #21): each slice of a window (its site) against the matching reference slice,
a KS effect-size floor, and a share threshold calibrated on held-out reference windows. Synthetic frames here; the
real-image path through `lensmith drift` is the last test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from servekit import copy_project, tiny_params

from lensmith.drift.calibration import ks_distance, slice_threshold, window_tests, sorted_columns
from lensmith.drift.embeddings import Projection
from lensmith.drift.reference import Reference, build_reference, load_reference, reference_calibration
from lensmith.drift.report import sliced_comparison
from lensmith.drift.slices import NEW_VALUE, TOO_SMALL, WHOLE, site_like_columns, slice_keys
from lensmith.drift.trigger import decide_slices
from lensmith.params import DriftParams

pytestmark = pytest.mark.timeout(900)

COLUMNS = ["brightness", "contrast", "mean_r", "mean_g"]
SITE_MEANS = {"A": 100.0, "B": 150.0}


def site_rows(site: str, n: int, rng: np.random.Generator, split: str = "train", shift: float = 0.0, batch_size: int = 5) -> pd.DataFrame:
    """Rows of one site: each column ~ N(site mean + batch effect + shift, 5), batches of `batch_size`."""
    batch = np.arange(n) // batch_size
    effect = rng.normal(0, 1.0, batch.max() + 1)[batch]
    frame = pd.DataFrame({c: SITE_MEANS.get(site, 60.0) + effect + shift + rng.normal(0, 5, n) for c in COLUMNS})
    frame["split"] = split
    frame["site"] = site
    frame["group"] = [f"{site}-{split}-{b}" for b in batch]
    return frame


def reference_of(frame: pd.DataFrame, dp: DriftParams, calibrate: bool = False) -> Reference:
    meta = {
        "embedding_columns": [],
        "slices": {"columns": ["site"], "reason": "test"},
        "calibration": reference_calibration(frame, COLUMNS, ["site"], dp) if calibrate else None,
    }
    projection = Projection(np.zeros(1), np.zeros((1, 1)), np.ones(1))
    return Reference(frame=frame, meta=meta, projection=projection)


def params(**kw: object) -> DriftParams:
    return DriftParams(min_window=5, min_slice_rows=50, calibration_windows=60, calibration_sizes=[100, 1000], **kw)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_a_window_slice_is_compared_with_the_matching_reference_rows(rng: np.random.Generator) -> None:
    frame = pd.concat([site_rows("A", 400, rng), site_rows("B", 400, rng)], ignore_index=True)
    reference = reference_of(frame, params())
    window = site_rows("A", 200, rng, split="window")
    comparison = sliced_comparison(window, reference, COLUMNS, params())
    [verdict] = comparison.verdicts
    assert verdict.key == "site=A" and verdict.status == "compared" and verdict.reference_rows == 400
    assert not verdict.drifted and verdict.drifted_share == 0.0, "site A against site A's rows: nothing drifts"
    assert set(comparison.evidently_rows["site"]) == {"A"}, "Evidently's reference is the matching slice too"
    whole = sliced_comparison(window, reference_of(frame, params(slice_by=[])), COLUMNS, params(slice_by=[]))
    assert whole.verdicts[0].key == WHOLE and whole.verdicts[0].drifted_share == 1.0, "against the A+B mix every column differs"


def test_a_slice_too_small_in_the_reference_is_reported_not_judged(rng: np.random.Generator) -> None:
    frame = pd.concat([site_rows("A", 400, rng), site_rows("B", 12, rng)], ignore_index=True)
    window = pd.concat([site_rows("A", 100, rng, "window"), site_rows("B", 60, rng, "window", shift=30.0)], ignore_index=True)
    comparison = sliced_comparison(window, reference_of(frame, params()), COLUMNS, params())
    small = next(v for v in comparison.verdicts if v.key == "site=B")
    assert small.status == TOO_SMALL and not small.judged and not small.drifted and small.drifted_share is None
    assert "only 12 training row(s)" in small.reason and "drift.min_slice_rows 50" in small.reason
    decision = decide_slices(comparison.verdicts, None, 0.9, len(window), params())
    assert not decision.retrain and "too small to compare" in decision.reason


def test_a_value_the_reference_never_saw_is_drift_compared_with_the_whole_reference(rng: np.random.Generator) -> None:
    frame = pd.concat([site_rows("A", 400, rng), site_rows("B", 400, rng)], ignore_index=True)
    window = site_rows("C", 100, rng, "window")
    comparison = sliced_comparison(window, reference_of(frame, params()), COLUMNS, params())
    [verdict] = comparison.verdicts
    assert verdict.key == "site=C" and verdict.status == NEW_VALUE and verdict.drifted
    assert verdict.drifted_share == 1.0, "compared with the whole reference, site C's content differs too"
    assert len(comparison.evidently_rows) == len(frame)
    decision = decide_slices(comparison.verdicts, None, 0.9, len(window), params())
    assert decision.retrain and "site=C: a value the reference has never seen" in decision.reason


def test_the_calibrated_threshold_is_recorded_in_the_reference_and_used(rng: np.random.Generator) -> None:
    frame = pd.concat([site_rows(s, n, rng, split) for s in "AB" for split, n in (("train", 600), ("val", 150))], ignore_index=True)
    dp = params()
    reference = reference_of(frame, dp, calibrate=True)
    calibration = reference.calibration
    assert calibration["p_value"] == dp.p_value and calibration["min_effect"] == dp.min_effect
    assert set(calibration["slices"]) == {WHOLE, "site=A", "site=B"} and calibration["group_column"] == "group"
    site_a = calibration["slices"]["site=A"]
    assert site_a["reference_rows"] == 600 and site_a["held_out_rows"] == 150 and site_a["held_out_groups"] == 30
    assert set(site_a["sizes"]) == {"100", "1000"} and len(site_a["sizes"]["1000"]) == 60
    expected = slice_threshold(calibration, "site=A", COLUMNS, 1000, dp.false_alarm_rate, dp.share_threshold)
    assert expected.source == "calibrated" and expected.false_alarm_rate <= dp.false_alarm_rate
    window = site_rows("A", 1000, rng, "window")
    comparison = sliced_comparison(window, reference, COLUMNS, dp)
    [verdict] = comparison.verdicts
    assert verdict.threshold == expected.share and verdict.false_alarm_rate == expected.false_alarm_rate
    assert "calibrated threshold" in verdict.reason and "at 1000 images" in verdict.reason
    stale = sliced_comparison(window, reference, COLUMNS, params(min_effect=0.2))
    assert stale.verdicts[0].false_alarm_rate is None and stale.verdicts[0].threshold == dp.share_threshold
    assert any("rebuild the reference" in n for n in stale.notes)


def test_the_effect_size_floor_keeps_a_large_window_with_a_trivial_shift_quiet(rng: np.random.Generator) -> None:
    reference = sorted_columns(pd.DataFrame({"x": rng.normal(0, 1, 20_000)}), ["x"])
    trivial = pd.DataFrame({"x": rng.normal(0.06, 1, 20_000)})
    real = pd.DataFrame({"x": rng.normal(0.8, 1, 20_000)})
    [significant] = window_tests(reference, trivial, ["x"], 0.05, 0.0)
    assert significant.drifted and significant.p_value < 0.05, "without the floor a large window flags the trivial shift"
    [floored] = window_tests(reference, trivial, ["x"], 0.05, 0.1)
    assert not floored.drifted and floored.statistic < 0.1
    [shifted] = window_tests(reference, real, ["x"], 0.05, 0.1)
    assert shifted.drifted and shifted.statistic > 0.25


def test_ks_distance_is_scipys_statistic(rng: np.random.Generator) -> None:
    from scipy import stats

    a, b = rng.normal(0, 1, 300), np.round(rng.normal(0.2, 1, 120), 1)  # ties too
    assert ks_distance(np.sort(a), b) == pytest.approx(stats.ks_2samp(a, b).statistic)


def test_auto_slices_are_the_columns_each_batch_holds_one_value_of() -> None:
    frame = pd.DataFrame({
        "site": ["A", "A", "B", "B", "A", "A"], "lighting": ["d", "l", "d", "l", "d", "l"],
        "batch": ["a1", "a1", "b1", "b1", "a2", "a2"],
    })
    assert site_like_columns(frame, ["site", "lighting", "batch"], "batch") == ["site"]
    keys = slice_keys(pd.DataFrame({"site": ["A", None], "line": [1.0, 2.0]}), ["site", "line"])
    assert list(keys) == ["site=A line=1", None]


# ---- real demo images through `lensmith drift` -------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny exported project with splits of 300 demo images (sites A/B): enough held-out batches per site."""
    from lensmith.demodata import generate_demo_dataset
    from lensmith.params import params_from_dict

    layout = copy_project(tmp_path_factory.mktemp("driftcal"))
    raw_dir = layout.root / "data/raw/cal"
    generate_demo_dataset(raw_dir, sites=None, seed=3, per_class=60, image_size=64)
    meta = pd.read_csv(raw_dir / "metadata.csv")
    meta["file"] = [f"data/raw/cal/{p}" for p in meta["path"]]
    meta["group"] = meta["batch"]
    batches = sorted(set(meta["batch"]))
    held_out = set(batches[::3])  # a third of the batches: the validation split
    for name, rows in (("val", meta[meta["batch"].isin(held_out)]), ("train", meta[~meta["batch"].isin(held_out)])):
        rows.reset_index(drop=True).to_parquet(layout.split_file(name), index=False)
    raw = tiny_params().model_dump(mode="json")
    raw["drift"] = {"model": "candidate", "min_window": 5, "embedding_dims": 4, "min_slice_rows": 20, "calibration_windows": 40}
    (layout.root / "params.yaml").write_text(json.dumps(raw))
    build_reference(params_from_dict(raw), layout, layout.candidate)
    return layout.root


def test_cli_drift_compares_each_site_with_its_slice_and_states_the_false_alarm_rate(project: Path, tmp_path: Path) -> None:
    from lensmith.cli import app
    from lensmith.demodata import generate_demo_dataset

    root = tmp_path / "p"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".cache"))
    reference = load_reference(root / "models/candidate")
    assert reference.slice_columns == ["site"] and {"site", "lighting", "camera"} <= set(reference.context_columns)
    assert {"site", "group"} <= set(reference.frame.columns) and reference.calibration["group_column"] == "group"
    assert reference.calibration["slices"]["site=A"]["sizes"], "site A has enough held-out rows to be calibrated"
    base = ["drift", "--params", str(root / "params.yaml"), "--root", str(root)]
    runner = CliRunner()
    same = runner.invoke(app, [*base, "--current", "data/raw/cal", "--where", "site=A"])
    assert same.exit_code == 0, same.output
    report = json.loads((root / "reports/drift.json").read_text())
    [verdict] = report["slices"]
    assert verdict["key"] == "site=A" and verdict["status"] == "compared" and verdict["false_alarm_rate"] is not None
    assert report["false_alarm"]["calibrated"] and report["false_alarm"]["expected"] == verdict["false_alarm_rate"]
    assert "expected false-alarm rate" in same.output
    assert "expected false-alarm rate" in (root / "reports/drift.html").read_text()
    generate_demo_dataset(root / "site_c", sites=["C"], seed=5, per_class=4, image_size=64)
    new_site = runner.invoke(app, [*base, "--current", "site_c"])
    assert new_site.exit_code == 0, new_site.output
    report = json.loads((root / "reports/drift.json").read_text())
    assert [v["status"] for v in report["slices"]] == ["new_value"] and report["decision"]["retrain"]
    assert "site=C: a value the reference has never seen" in new_site.output


def test_held_out_windows_are_drawn_by_batch_when_the_split_carries_no_group(rng: np.random.Generator) -> None:
    from lensmith.drift.reference import resampling_group

    frame = site_rows("A", 50, rng).rename(columns={"group": "batch"})
    assert resampling_group(frame, ["site", "batch"]) == "batch"
    assert resampling_group(site_rows("A", 50, rng), ["site"]) == "group"
    assert resampling_group(frame.drop(columns="batch"), ["site"]) is None


# ---- the confidence rule, calibrated jointly with the share ---------------------------------------------------


def test_joint_thresholds_keep_the_share_and_give_the_confidence_drop_the_budget_it_leaves() -> None:
    from lensmith.drift.calibration import joint_thresholds

    # 99 null windows: (1 + alarms) / 100 <= 0.05 allows 4 null alarms in all
    shares = np.zeros(99)
    shares[:2] = 1.0  # two windows the share flags (at 1 drifted column of 4): rate 3 %
    drops = np.linspace(-0.02, 0.02, 99)
    drops[:2] = 0.5  # large drops in the windows the share flags already: they cost nothing more
    drops[2:6] = [0.20, 0.15, 0.12, 0.10]
    share, drop, rate, share_rate = joint_thresholds(shares, 4, drops, 0.05, 0.05)
    assert share == 0.25 and share_rate == pytest.approx(0.03)
    assert drop == pytest.approx(0.1201), "just above the 3rd largest unflagged drop: 2 more null alarms, 4 in all"
    assert rate == pytest.approx(0.05) and rate <= 0.05
    # the combined rule, counted on the null windows, is what `rate` says
    assert (1 + ((shares >= share) | (drops >= drop)).sum()) / 100 == pytest.approx(rate)


def test_the_confidence_floor_holds_and_a_spent_budget_puts_the_drop_above_every_unflagged_null() -> None:
    from lensmith.drift.calibration import joint_thresholds

    quiet = np.linspace(-0.01, 0.01, 99)
    share, drop, rate, _ = joint_thresholds(np.zeros(99), 4, quiet, 0.05, 0.05)
    assert drop == 0.05 and rate == pytest.approx(0.01), "null drops far below drift.confidence_drop: the floor is the threshold"
    shares = np.zeros(99)
    shares[:4] = 1.0  # the share spends the whole budget (5 %)
    drops = np.linspace(0.0, 0.09, 99)
    share, drop, rate, share_rate = joint_thresholds(shares, 4, drops, 0.05, 0.05)
    assert share_rate == pytest.approx(0.05) and rate == pytest.approx(0.05)
    assert drop > drops[4:].max() and drop == pytest.approx(0.0901)


def with_confidence(frame: pd.DataFrame, rng: np.random.Generator, mean: float = 0.85) -> pd.DataFrame:
    """The model's confidence per row: a batch effect and noise around `mean`."""
    codes = pd.factorize(frame["group"])[0]
    effect = rng.normal(0, 0.15, codes.max() + 1)[codes]  # batches differ: a 100-image window's mean varies by ~4 %
    return frame.assign(confidence=np.clip(mean + effect + rng.normal(0, 0.05, len(frame)), 0.2, 1.0))


def calibrated_reference(rng: np.random.Generator, dp: DriftParams) -> Reference:
    frame = pd.concat([with_confidence(site_rows(s, n, rng, split), rng) for s in "AB" for split, n in (("train", 600), ("val", 150))],
                      ignore_index=True)
    reference = reference_of(frame, dp, calibrate=True)
    reference.meta["predictions"] = {"mean_confidence": float(frame.loc[frame["split"] == "val", "confidence"].mean())}
    return reference


def test_a_slice_is_judged_on_its_calibrated_confidence_drop_and_the_report_states_the_combined_rate(rng: np.random.Generator) -> None:
    from lensmith.drift.report import false_alarm_block

    dp = params()
    reference = calibrated_reference(rng, dp)
    entry = reference.calibration["slices"]["site=A"]
    assert len(entry["confidence_drops"]["100"]) == 60 and 0.8 < entry["confidence_reference"] < 0.9
    threshold = slice_threshold(reference.calibration, "site=A", COLUMNS, 100, dp.false_alarm_rate, dp.share_threshold, dp.confidence_drop)
    assert threshold.confidence_calibrated and threshold.confidence_drop >= dp.confidence_drop
    assert threshold.share_rate <= threshold.false_alarm_rate <= dp.false_alarm_rate

    same = with_confidence(site_rows("A", 100, rng, "window"), rng)
    comparison = sliced_comparison(same, reference, COLUMNS, dp)
    [verdict] = comparison.verdicts
    assert verdict.confidence_calibrated and verdict.confidence_threshold == threshold.confidence_drop and not verdict.drifted
    assert verdict.false_alarm_rate == threshold.false_alarm_rate
    block = false_alarm_block(comparison, len(same), dp)
    assert block["rule"] == "share or confidence drop" and block["expected"] == threshold.false_alarm_rate

    reference_mean = entry["confidence_reference"]
    low = same.assign(confidence=same["confidence"] * reference_mean * (1 - threshold.confidence_drop - 0.01) / same["confidence"].mean())
    [fell] = sliced_comparison(low, reference, COLUMNS, dp).verdicts
    assert fell.drifted and fell.drifted_share < fell.threshold, "the confidence drop alone flags the slice"
    decision = decide_slices([fell], float(low["confidence"].mean()), reference.mean_confidence, len(low), dp)
    assert decision.retrain and "site=A: mean confidence fell" in decision.reason

    assert threshold.confidence_drop > dp.confidence_drop + 0.002, "this null is wider than the floor"
    floor_only = same.assign(confidence=same["confidence"] * reference_mean * (1 - dp.confidence_drop - 0.001) / same["confidence"].mean())
    [kept] = sliced_comparison(floor_only, reference, COLUMNS, dp).verdicts
    assert not kept.drifted, "a drop past drift.confidence_drop but within the calibrated threshold is not an alarm"
    decision = decide_slices([kept], float(floor_only["confidence"].mean()), reference_mean, len(floor_only), dp)
    assert not decision.retrain, "nor is it one for the window as a whole"


def test_an_older_reference_without_confidence_drops_keeps_the_fixed_rule_and_says_so(rng: np.random.Generator) -> None:
    from lensmith.drift.report import false_alarm_block

    dp = params()
    reference = calibrated_reference(rng, dp)
    for entry in reference.calibration["slices"].values():
        entry.pop("confidence_drops", None)
        entry.pop("confidence_reference", None)
    window = with_confidence(site_rows("A", 100, rng, "window"), rng)
    window["confidence"] = reference.mean_confidence * 0.9  # a 10 % drop
    comparison = sliced_comparison(window, reference, COLUMNS, dp)
    [verdict] = comparison.verdicts
    assert verdict.confidence_threshold is None and verdict.false_alarm_rate is not None
    assert any("drift.confidence_drop 5% applies as a fixed rule" in n for n in comparison.notes)
    block = false_alarm_block(comparison, len(window), dp)
    assert block["rule"] == "share only" and not block["confidence_calibrated"]
    decision = decide_slices(comparison.verdicts, float(window["confidence"].mean()), reference.mean_confidence, len(window), dp)
    assert decision.retrain and "mean confidence fell 10.0%" in decision.reason and "drift.confidence_drop 5%" in decision.reason


def test_null_confidence_drops_carry_the_error_of_the_held_out_mean(rng: np.random.Generator) -> None:
    from lensmith.drift.calibration import null_windows

    # 30 held-out batches of 5 rows, each batch at its own confidence: their mean is known to ~1 % only
    held_out = site_rows("A", 150, rng, "val").assign(confidence=np.repeat(rng.normal(0.85, 0.05, 30), 5))
    _, drops = null_windows(held_out, held_out, held_out["group"], COLUMNS[:1], 3000, 60, 0.05, 0.1, 0)
    # a 3,000-row window (600 batch draws) alone varies by ~0.2 %; the held-out mean's own error is ~1 %
    assert drops is not None and len(drops) == 60 and np.std(drops) > 0.006
