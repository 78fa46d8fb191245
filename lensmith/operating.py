"""The plant's operating point: a decision threshold on the defect score, chosen on the validation split to meet a
target (a minimum defect recall, a maximum false-alarm rate, or the lowest expected cost), optionally with a review
band around it sized by a target review rate; and the figures any split has at that point.

The defect score of an image is 1 - P(negative class): "defect" when score >= threshold. Thresholds are taken from
the validation scores themselves (scikit-learn's ROC curve, every distinct score), so a figure on validation at the
chosen point is exactly what the target asked for. No torch here: the service and the gate use it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from lensmith.errors import DataError

Target = Literal["min_recall", "max_false_alarm_rate", "min_cost"]
Decision = Literal["defect", "ok", "review"]


@dataclass(frozen=True)
class OperatingPoint:
    """Decide "defect" at score >= threshold; with a review band, scores in [review_low, review_high) go to a human
    (review_low <= threshold <= review_high; no band: both equal the threshold)."""

    threshold: float
    review_low: float
    review_high: float
    target: str
    min_recall: float | None
    max_false_alarm_rate: float | None
    cost_ratio: float
    review_rate: float
    chosen_on: str = "val"

    def decide(self, score: float) -> Decision:
        if score >= self.review_high:
            return "defect"
        if score < self.review_low:
            return "ok"
        return "review"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        """The point as stored (meta.json, ONNX metadata); a KeyError/ValueError names a damaged record."""

        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(
            threshold=float(data["threshold"]), review_low=float(data["review_low"]),
            review_high=float(data["review_high"]), target=str(data["target"]), min_recall=number("min_recall"),
            max_false_alarm_rate=number("max_false_alarm_rate"), cost_ratio=float(data["cost_ratio"]),
            review_rate=float(data.get("review_rate", 0.0)), chosen_on=str(data.get("chosen_on", "val")),
        )


def defect_scores(probabilities: np.ndarray, negative_index: int) -> np.ndarray:
    """1 - P(negative class) per image, from softmax probabilities (N x classes)."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64)[:, negative_index]


def _roc(is_defect: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-alarm rate, recall, threshold) at every distinct score, thresholds decreasing (first: nothing flagged)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_defect, scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, np.nextafter(1.0, 2.0))  # sklearn's first threshold is +inf: flag nothing
    return fpr, tpr, thresholds


def _check_both_classes(is_defect: np.ndarray) -> None:
    positives = int(is_defect.sum())
    if positives == 0 or positives == len(is_defect):
        missing = "defect" if positives == 0 else "ok"
        raise DataError(
            f"the validation split has no {missing} images, so no decision threshold can be chosen on it; "
            "add such images or set evaluate.operating_point.target to use argmax (see docs/params.md)"
        )


def choose_threshold(
    is_defect: np.ndarray, scores: np.ndarray, target: Target, min_recall: float | None,
    max_false_alarm_rate: float | None, cost_ratio: float,
) -> float:
    """The threshold meeting `target` on these scores:
    min_recall: the highest threshold whose recall >= min_recall (the fewest false alarms that catch enough defects);
    max_false_alarm_rate: the lowest threshold whose false-alarm rate <= the limit (the most defects within budget);
    min_cost: the threshold of least cost_ratio * missed + false alarms (ties: the higher threshold).
    The other limit, when set, must hold too: a DataError says what the scores allow instead."""
    is_defect = np.asarray(is_defect, dtype=bool)
    _check_both_classes(is_defect)
    fpr, tpr, thresholds = _roc(is_defect, np.asarray(scores, dtype=np.float64))
    if target == "min_recall":
        if min_recall is None:
            raise ValueError("target min_recall needs min_recall")
        index = int(np.flatnonzero(tpr >= min_recall - 1e-12)[0])  # thresholds decrease: the first is the highest
    elif target == "max_false_alarm_rate":
        if max_false_alarm_rate is None:
            raise ValueError("target max_false_alarm_rate needs max_false_alarm_rate")
        index = int(np.flatnonzero(fpr <= max_false_alarm_rate + 1e-12)[-1])
    elif target == "min_cost":
        positives, negatives = int(is_defect.sum()), int((~is_defect).sum())
        index = int(np.argmin(cost_ratio * (1.0 - tpr) * positives + fpr * negatives))
    else:
        raise ValueError(f"unknown operating-point target {target!r}")
    _check_limits(fpr[index], tpr[index], fpr, tpr, min_recall, max_false_alarm_rate)
    return float(thresholds[index])


def _check_limits(
    fpr_at: float, tpr_at: float, fpr: np.ndarray, tpr: np.ndarray, min_recall: float | None, max_far: float | None
) -> None:
    """Both limits hold at the chosen point, or a DataError naming the best the validation scores allow."""
    recall_short = min_recall is not None and tpr_at < min_recall - 1e-12
    alarms_over = max_far is not None and fpr_at > max_far + 1e-12
    if not (recall_short or alarms_over):
        return
    best = float(tpr[fpr <= max_far + 1e-12].max()) if max_far is not None else float(tpr.max())
    raise DataError(
        f"no threshold meets both evaluate.operating_point.min_recall={min_recall} and max_false_alarm_rate={max_far} "
        f"on the validation split: within that false-alarm rate the best defect recall is {best:.3f} "
        f"(the chosen point has recall {tpr_at:.3f}, false-alarm rate {fpr_at:.3f}); relax one limit or set it to null"
    )


def review_band(scores: np.ndarray, threshold: float, review_rate: float) -> tuple[float, float]:
    """[low, high) around the threshold holding about `review_rate` of these scores: the images closest to the
    threshold, where the model is least sure. review_rate 0: no band (low = high = threshold)."""
    if review_rate <= 0.0 or len(scores) == 0:
        return threshold, threshold
    distance = np.abs(np.asarray(scores, dtype=np.float64) - threshold)
    k = max(1, math.ceil(review_rate * len(distance)))
    radius = float(np.sort(distance)[k - 1])
    return max(0.0, threshold - radius), min(np.nextafter(1.0, 2.0), np.nextafter(threshold + radius, 2.0))


def choose_operating_point(
    is_defect: np.ndarray, scores: np.ndarray, target: Target, min_recall: float | None,
    max_false_alarm_rate: float | None, cost_ratio: float, review_rate: float,
) -> OperatingPoint:
    threshold = choose_threshold(is_defect, scores, target, min_recall, max_false_alarm_rate, cost_ratio)
    low, high = review_band(scores, threshold, review_rate)
    return OperatingPoint(threshold, low, high, target, min_recall, max_false_alarm_rate, cost_ratio, review_rate)


def figures_at(point: OperatingPoint, is_defect: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """What a split looks like at the operating point. Automatic decisions only (`recall`, `false_alarm_rate`,
    `precision`); reviewed images counted apart, and `recall_with_review` assumes the reviewer is right."""
    is_defect = np.asarray(is_defect, dtype=bool)
    decisions = np.array([point.decide(float(s)) for s in np.asarray(scores, dtype=np.float64)], dtype=object)
    flagged, review = decisions == "defect", decisions == "review"
    positives, negatives = int(is_defect.sum()), int((~is_defect).sum())
    caught, false_alarms = int((flagged & is_defect).sum()), int((flagged & ~is_defect).sum())
    missed = int((decisions == "ok")[is_defect].sum())
    return {
        "n": int(len(is_defect)),
        "defects": positives,
        "recall": caught / positives if positives else None,
        "recall_with_review": (caught + int((review & is_defect).sum())) / positives if positives else None,
        "false_alarm_rate": false_alarms / negatives if negatives else None,
        "precision": caught / int(flagged.sum()) if flagged.any() else None,
        "review_rate": float(review.mean()) if len(review) else 0.0,
        "missed_defects": missed,
        "false_alarms": false_alarms,
        "expected_cost": point.cost_ratio * missed + false_alarms,
    }


# ---- the rule a model travels with ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionRule:
    """How a served prediction becomes a decision. kind "threshold": defect | ok | review from the defect score
    (the probability of the positive classes) at the operating point; kind "argmax": the most probable class, or
    review below `min_confidence`."""

    kind: Literal["threshold", "argmax"]
    classes: tuple[str, ...]
    negative_class: str | None = None
    positive_classes: tuple[str, ...] = ()
    point: OperatingPoint | None = None
    min_confidence: float | None = None

    def decide(self, probabilities: np.ndarray) -> str:
        """One image's class probabilities -> its decision."""
        if self.kind == "threshold" and self.point is not None:
            return self.point.decide(self.defect_score(probabilities))
        best = int(np.argmax(probabilities))
        if self.min_confidence is not None and float(probabilities[best]) < self.min_confidence:
            return "review"
        return self.classes[best]

    def decide_batch(self, probabilities: np.ndarray) -> tuple[list[str], list[float | None]]:
        """Decisions and defect scores (None for argmax rules) of N x classes probabilities, vectorised."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if self.kind == "threshold" and self.point is not None:
            positives = [self.classes.index(c) for c in self.positive_classes]
            scores = probabilities[:, positives].sum(axis=1)
            point = self.point
            decisions = np.where(scores >= point.review_high, "defect", np.where(scores < point.review_low, "ok", "review"))
            return decisions.tolist(), scores.tolist()
        best = probabilities.argmax(axis=1)
        confident = (probabilities[np.arange(len(best)), best] >= self.min_confidence
                     if self.min_confidence is not None else np.ones(len(best), dtype=bool))
        return [self.classes[b] if ok else "review" for b, ok in zip(best.tolist(), confident.tolist())], [None] * len(best)

    def defect_score(self, probabilities: np.ndarray) -> float:
        """P(any positive class): 1 - P(negative class) when every other class is a defect."""
        return float(sum(float(probabilities[self.classes.index(c)]) for c in self.positive_classes))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "classes": list(self.classes), "negative_class": self.negative_class,
            "positive_classes": list(self.positive_classes), "min_confidence": self.min_confidence,
            "operating_point": None if self.point is None else self.point.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecisionRule:
        point = data.get("operating_point")
        return cls(
            kind=data["kind"], classes=tuple(data["classes"]), negative_class=data.get("negative_class"),
            positive_classes=tuple(data.get("positive_classes") or ()),
            point=None if point is None else OperatingPoint.from_dict(point),
            min_confidence=data.get("min_confidence"),
        )


def argmax_rule(classes: tuple[str, ...], min_confidence: float | None) -> DecisionRule:
    return DecisionRule("argmax", classes, min_confidence=min_confidence)
