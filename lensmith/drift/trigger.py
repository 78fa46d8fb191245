"""The retraining decision: data drift share or a relative drop of mean confidence, on a large enough window.

`decide` judges one drifted share against drift.share_threshold; `decide_slices` judges the window slice by slice
(lensmith.drift.slices), each against its own calibrated threshold (lensmith.drift.calibration)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lensmith.params import DriftParams


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)  # why it triggers (empty when it does not)
    reason: str = ""  # one line for logs and alerts, given either way

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": "retrain" if self.retrain else "keep"}


@dataclass(frozen=True)
class SliceVerdict:
    """One slice of the window, judged against its matching reference slice."""

    key: str
    status: str  # compared | too_small | new_value | whole
    n_images: int
    reference_rows: int
    drifted_share: float | None  # None when not compared
    threshold: float | None
    false_alarm_rate: float | None  # expected, at this threshold and window size; None when not calibrated
    judged: bool  # False: too small a reference slice, or too few images in the window
    drifted: bool
    reason: str  # one line, given either way
    # the slice's own confidence rule (None: not judged per slice; the window's mean confidence is, by decide_slices)
    confidence_now: float | None = None
    confidence_reference: float | None = None  # the slice's held-out mean confidence (calibrated), else the reference's
    confidence_drop: float | None = None  # relative, positive when confidence fell
    confidence_threshold: float | None = None  # the slice drifts at a drop >= this
    confidence_calibrated: bool = False  # the threshold was chosen jointly with the share's on held-out windows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_drop(now: float | None, reference: float) -> float | None:
    """(reference - now) / reference; positive when confidence fell. None when not measurable."""
    if now is None or reference <= 0:
        return None
    return (reference - now) / reference


def below_min_window(n_images: int, dp: DriftParams) -> Decision | None:
    """The "keep" decision of a window too small to act on, or None when it is large enough."""
    if n_images < dp.min_window:
        return Decision(False, [], f"window of {n_images} image(s) is below drift.min_window={dp.min_window}: reported, not acted on")
    return None


def confidence_drop_reason(confidence_now: float | None, confidence_reference: float, dp: DriftParams) -> tuple[str | None, str]:
    """(why the drop of mean confidence triggers, or None; the change as text for a "keep" line)."""
    drop = relative_drop(confidence_now, confidence_reference)
    change = "n/a" if drop is None else f"{drop:+.1%}"
    if drop is not None and drop >= dp.confidence_drop:
        return (f"mean confidence fell {drop:.1%} ({confidence_reference:.3f} -> {confidence_now:.3f}) >= drift.confidence_drop "
                f"{dp.confidence_drop:.0%}"), change
    return None, change


def retrain_or_keep(reasons: list[str], keep: str) -> Decision:
    return Decision(True, reasons, "retrain: " + "; ".join(reasons)) if reasons else Decision(False, [], keep)


def decide(drifted_share: float | None, confidence_now: float | None, confidence_reference: float, n_images: int, dp: DriftParams) -> Decision:
    """Retrain when drifted_share >= share_threshold or confidence dropped by >= confidence_drop (relative)."""
    small = below_min_window(n_images, dp)
    if small is not None:
        return small
    reasons = []
    if drifted_share is not None and drifted_share >= dp.share_threshold:
        reasons.append(f"drifted share {drifted_share:.2f} >= drift.share_threshold {dp.share_threshold:.2f}")
    confidence, change = confidence_drop_reason(confidence_now, confidence_reference, dp)
    reasons += [confidence] if confidence else []
    share = "n/a" if drifted_share is None else f"{drifted_share:.2f}"
    return retrain_or_keep(reasons, f"keep: drifted share {share} < {dp.share_threshold:.2f} and confidence change {change} below a {dp.confidence_drop:.0%} drop")


def decide_slices(verdicts: list[SliceVerdict], confidence_now: float | None, confidence_reference: float, n_images: int, dp: DriftParams) -> Decision:
    """Retrain when a slice drifted (its share reached its threshold, its mean confidence dropped past its threshold,
    or it is a value the reference never saw). When no slice is judged on confidence (a reference whose calibration
    holds no confidence drops), the window's mean confidence is, against the fixed drift.confidence_drop (relative)."""
    small = below_min_window(n_images, dp)
    if small is not None:
        return small
    per_slice = any(v.confidence_threshold is not None for v in verdicts)
    confidence, change = (None, "") if per_slice else confidence_drop_reason(confidence_now, confidence_reference, dp)
    reasons = [v.reason for v in verdicts if v.drifted] + ([confidence] if confidence else [])
    judged = "; ".join(v.reason for v in verdicts) or "nothing to compare"
    if per_slice:
        return retrain_or_keep(reasons, f"keep: {judged}")
    return retrain_or_keep(reasons, f"keep: {judged}; confidence change {change} below a {dp.confidence_drop:.0%} drop")
