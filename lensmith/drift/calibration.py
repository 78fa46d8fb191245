"""A drift decision whose false-alarm rate is measured, not assumed.

Per column, a window drifts when the two-sample KS test (scipy's ks_2samp: the test Evidently runs for
num_method="ks") gives p < drift.p_value AND the KS distance is at least drift.min_effect: a window of
thousands of images makes a trivial difference significant, and a plant does not want a retrain for it.

The share of drifted columns that triggers is chosen on the reference itself: windows resampled from its
held-out rows (the validation split, whose batches training never saw), whole batches at a time so that
between-batch variation is part of the null, at each calibrated window size and per slice, are tested against
the slice's training rows with the very same column test. Which columns drifted in each null window is stored in
drift_reference.json, so the report recomputes the null shares on the columns it monitors (a prediction-log window
has no embeddings) and picks the smallest share whose false-alarm rate is within drift.false_alarm_rate.
The rate is estimated conservatively as (1 + null windows at or above the threshold) / (1 + null windows).

The other retrain rule, a relative drop of the model's mean confidence, is calibrated on the very same null windows:
each one's mean confidence is stored as a drop relative to the slice's held-out mean confidence (itself resampled:
`null_windows`), and the drop
threshold is chosen so that the combined rule (share over its threshold OR drop over its threshold) keeps the
false-alarm rate of those windows within drift.false_alarm_rate (`joint_thresholds`), never below
drift.confidence_drop (a floor: a smaller drop never alarms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

HELD_OUT_SPLIT = "val"
REFERENCE_SPLIT = "train"


@dataclass(frozen=True)
class ColumnTest:
    column: str
    statistic: float  # KS distance
    p_value: float | None  # None when the distance is below the floor (the test cannot flag it, so it is skipped)
    drifted: bool


def ks_distance(reference_sorted: np.ndarray, current: np.ndarray) -> float:
    """The two-sample KS statistic (as scipy's ks_2samp), with the reference already sorted."""
    current = np.sort(current)
    points = np.concatenate([reference_sorted, current])
    cdf_ref = np.searchsorted(reference_sorted, points, side="right") / len(reference_sorted)
    cdf_cur = np.searchsorted(current, points, side="right") / len(current)
    return float(np.max(np.abs(cdf_ref - cdf_cur)))


def column_test(column: str, reference_sorted: np.ndarray, current: np.ndarray, p_value: float, min_effect: float, always_p: bool = False) -> ColumnTest:
    """KS distance, and the p-value whenever the distance reaches the floor (or `always_p`)."""
    from scipy import stats

    if len(reference_sorted) == 0 or len(current) == 0:
        return ColumnTest(column, 0.0, None, False)
    distance = ks_distance(reference_sorted, current)
    if distance < min_effect and not always_p:
        return ColumnTest(column, distance, None, False)
    p = float(stats.ks_2samp(reference_sorted, current).pvalue)
    return ColumnTest(column, distance, p, bool(p < p_value and distance >= min_effect))


def sorted_columns(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: np.sort(frame[c].dropna().to_numpy(float)) for c in columns if c in frame.columns}


def window_tests(reference: dict[str, np.ndarray], current: pd.DataFrame, columns: Sequence[str], p_value: float, min_effect: float,
                 always_p: bool = False) -> list[ColumnTest]:
    return [
        column_test(c, reference[c], current[c].dropna().to_numpy(float), p_value, min_effect, always_p)
        for c in columns if c in reference and c in current.columns
    ]


# ---- the null: resampled held-out windows ------------------------------------------------------------------


def group_blocks(groups: pd.Series | None, n_rows: int) -> list[np.ndarray]:
    """Row positions per group (batch), or one block per row without groups."""
    if groups is None:
        return [np.array([i]) for i in range(n_rows)]
    codes = pd.factorize(groups.fillna("__none__").astype(str))[0]
    return [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if n_rows else []


def resampled_window(blocks: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of `size` rows made of whole groups drawn with replacement (the last one cut)."""
    mean_block = max(1.0, sum(len(b) for b in blocks) / len(blocks))
    picked: list[np.ndarray] = []
    total = 0
    while total < size:
        draw = rng.integers(0, len(blocks), size=int(math.ceil((size - total) / mean_block)) + 1)
        for i in draw:
            picked.append(blocks[i])
            total += len(blocks[i])
            if total >= size:
                break
    return np.concatenate(picked)[:size]


def held_out_confidence(held_out: pd.DataFrame) -> np.ndarray | None:
    """The model's confidence per held-out row, or None when the rows carry none."""
    if "confidence" not in held_out.columns or not held_out["confidence"].notna().any():
        return None
    return held_out["confidence"].to_numpy(float)


def null_windows(
    reference: pd.DataFrame, held_out: pd.DataFrame, groups: pd.Series | None, columns: Sequence[str], size: int,
    windows: int, p_value: float, min_effect: float, seed: int,
) -> tuple[list[list[int]], list[float] | None]:
    """For each of `windows` resampled held-out windows of `size` rows: the indices (into `columns`) that drift, and
    the relative drop of its mean confidence (None without confidences).

    The drop is taken from the mean of a second, independent resample of all held-out groups, not from the held-out
    mean itself: a fresh window is compared with that mean, which is an estimate from a few dozen batches, and its
    error is part of what a fresh window's drop varies by. Without it the null is too narrow for a slice whose
    held-out mean happens to sit high (measured: a site's 50 validation batches 3 % above its fresh windows)."""
    rng = np.random.default_rng(seed)
    reference_rng = np.random.default_rng([seed, 1])  # its own stream: the drifted columns do not depend on it
    ref_sorted = sorted_columns(reference, columns)
    values = {c: held_out[c].to_numpy(float) for c in columns}
    confidence = held_out_confidence(held_out)
    blocks = group_blocks(groups, len(held_out))
    out, drops = [], []
    for _ in range(windows):
        rows = resampled_window(blocks, size, rng)
        drifted = []
        for i, c in enumerate(columns):
            sample = values[c][rows]
            test = column_test(c, ref_sorted[c], sample[~np.isnan(sample)], p_value, min_effect)
            if test.drifted:
                drifted.append(i)
        out.append(drifted)
        if confidence is not None:
            mean = float(np.nanmean(confidence[resampled_window(blocks, len(held_out), reference_rng)]))
            drops.append(round((mean - float(np.nanmean(confidence[rows]))) / mean, 6) if mean > 0 else 0.0)
    return out, (drops if confidence is not None else None)


def calibrate_slice(
    reference: pd.DataFrame, held_out: pd.DataFrame, group_column: str | None, columns: Sequence[str], sizes: Sequence[int],
    windows: int, p_value: float, min_effect: float, seed: int,
) -> dict[str, Any]:
    """The slice's record in drift_reference.json: its row counts and, per size, the drifted columns of each null
    window ("sizes") and its relative drop of mean confidence ("confidence_drops", beside the held-out mean confidence
    the report compares a window's with, "confidence_reference"), when the held-out rows carry the model's confidence."""
    groups = held_out[group_column] if group_column and group_column in held_out.columns else None
    nulls = {size: null_windows(reference, held_out, groups, columns, size, windows, p_value, min_effect, seed + k)
             for k, size in enumerate(sizes)}
    entry: dict[str, Any] = {
        "reference_rows": int(len(reference)),
        "held_out_rows": int(len(held_out)),
        "held_out_groups": int(groups.nunique()) if groups is not None else int(len(held_out)),
        "sizes": {str(size): drifted for size, (drifted, _) in nulls.items()},
    }
    confidence = held_out_confidence(held_out)
    if confidence is not None and all(drops is not None for _, drops in nulls.values()):
        entry["confidence_reference"] = float(np.nanmean(confidence))
        entry["confidence_drops"] = {str(size): drops for size, (_, drops) in nulls.items()}
    return entry


# ---- the threshold -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    share: float  # trigger at a drifted share >= this
    false_alarm_rate: float | None  # expected, at this window size, of the rule it covers (see confidence_calibrated); None when not calibrated
    calibrated_size: int | None  # the calibrated window size used
    null_windows: int
    source: str  # "calibrated" or "drift.share_threshold"
    held_out_rows: int = 0
    confidence_drop: float | None = None  # trigger at a relative drop of mean confidence >= this; None: drift.confidence_drop, uncalibrated
    confidence_reference: float | None = None  # the slice's held-out mean confidence the drop is relative to
    share_rate: float | None = None  # expected false-alarm rate of the share rule alone

    @property
    def confidence_calibrated(self) -> bool:
        """True when false_alarm_rate is that of the combined rule (share OR confidence drop), not the share's alone."""
        return self.confidence_drop is not None

    def text(self) -> str:
        """The share threshold and where it comes from (the confidence rule has its own words: `confidence_text`)."""
        if self.false_alarm_rate is None:
            return f"drift.share_threshold {self.share:.2f} (not calibrated)"
        return f"calibrated threshold {self.share:.2f} ({self.rate_text()})"

    def rate_text(self) -> str:
        # fewer held-out rows than the window: each is drawn several times, so the null is wider than fresh data's
        resampled = f" resampled from {self.held_out_rows} held-out rows," if self.held_out_rows < (self.calibrated_size or 0) else ""
        rule = "share or confidence drop: " if self.confidence_calibrated else ""
        return (f"{rule}expected false-alarm rate {self.false_alarm_rate:.1%} at {self.calibrated_size} images,{resampled} "
                f"{self.null_windows} held-out windows")


def nearest_size(sizes: Sequence[int], n: int) -> int:
    """The calibrated size closest to `n` on a log scale."""
    return min(sizes, key=lambda s: (abs(math.log(max(n, 1)) - math.log(s)), -s))


def null_shares(drifted: list[list[int]], calibrated_columns: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    """Drifted share of each null window over `columns` (those of the calibration the report monitors)."""
    wanted = {i for i, c in enumerate(calibrated_columns) if c in set(columns)}
    if not wanted:
        return np.zeros(len(drifted))
    return np.array([len(wanted.intersection(d)) / len(wanted) for d in drifted])


def share_threshold(shares: np.ndarray, n_columns: int, alpha: float) -> tuple[float, float]:
    """(smallest share k/n_columns whose conservative false-alarm rate is <= alpha, that rate); share 1.0 at worst."""
    rate = 1.0
    for k in range(1, n_columns + 1):
        share = k / n_columns
        rate = (1 + int((shares >= share - 1e-9).sum())) / (1 + len(shares))
        if rate <= alpha:
            return share, rate
    return 1.0, rate


def conservative_rate(alarms: np.ndarray) -> float:
    """(1 + null windows that alarm) / (1 + null windows): the rate a new window of the same null alarms at."""
    return (1 + int(alarms.sum())) / (1 + len(alarms))


def joint_thresholds(shares: np.ndarray, n_columns: int, drops: np.ndarray, floor: float, alpha: float) -> tuple[float, float, float, float]:
    """(share threshold, confidence-drop threshold, combined false-alarm rate, the share's alone) for the rule
    "drifted share >= share threshold OR drop >= drop threshold", on null windows' `shares` and `drops`.

    Data drift comes first: its threshold is the one it would have alone (the smallest share within `alpha`; it says
    what changed). The confidence drop takes the false-alarm budget that leaves, counted on the null windows the
    share does not already flag: the smallest drop (never below `floor`) such that the combined rule stays within
    `alpha`. When nothing is left it sits just above the largest drop of those windows, so it adds no null alarm;
    splitting `alpha` in two instead would raise the share threshold and lose power on data drift for the
    confidence rule's sake."""
    share, share_rate = share_threshold(shares, n_columns, alpha)
    flagged = shares >= share - 1e-9
    allowed = max(0, int(math.floor(alpha * (1 + len(shares)) + 1e-9)) - 1 - int(flagged.sum()))  # more null alarms allowed
    others = np.sort(drops[~flagged])[::-1]
    if len(others) <= allowed:
        threshold = floor
    else:
        # just above the (allowed + 1)-th largest drop of the unflagged windows, rounded up to 0.01 %
        threshold = max(floor, math.floor(float(others[allowed]) * 1e4 + 1.0) / 1e4)
    rate = conservative_rate(flagged | (drops >= threshold - 1e-12))
    return share, threshold, rate, share_rate


def slice_threshold(
    calibration: dict[str, Any] | None, key: str, columns: Sequence[str], n_images: int, alpha: float, fallback: float,
    confidence_floor: float | None = None,
) -> Threshold:
    """The thresholds of one slice for a window of `n_images` over `columns` at false-alarm rate `alpha`: the share
    alone, or with `confidence_floor` (drift.confidence_drop; the window carries confidences) the share and the
    confidence drop jointly, when the reference calibrated confidence (a reference made before that did not)."""
    entry = (calibration or {}).get("slices", {}).get(key)
    if not entry or not entry.get("sizes") or not columns:
        return Threshold(fallback, None, None, 0, "drift.share_threshold")
    size = nearest_size([int(s) for s in entry["sizes"]], n_images)
    drifted = entry["sizes"][str(size)]
    shares = null_shares(drifted, calibration["columns"], columns)
    n_columns = len([c for c in calibration["columns"] if c in set(columns)])
    held_out = int(entry.get("held_out_rows", 0))
    drops = (entry.get("confidence_drops") or {}).get(str(size))
    if confidence_floor is None or drops is None or len(drops) != len(drifted):
        share, rate = share_threshold(shares, n_columns, alpha)
        return Threshold(share, rate, size, len(drifted), "calibrated", held_out, share_rate=rate)
    share, drop, rate, share_rate = joint_thresholds(shares, n_columns, np.asarray(drops, float), confidence_floor, alpha)
    return Threshold(share, rate, size, len(drifted), "calibrated", held_out, drop, float(entry["confidence_reference"]), share_rate)


def calibration_matches(calibration: dict[str, Any] | None, p_value: float, min_effect: float) -> bool:
    """A calibration holds only for the column test it was made with."""
    return bool(calibration) and calibration.get("p_value") == p_value and calibration.get("min_effect") == min_effect
