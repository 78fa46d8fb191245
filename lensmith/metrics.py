"""Classification, positive-class, calibration and per-slice metrics as pure functions of arrays.

Inputs are class indices (`y_true`, `y_pred`: int arrays of shape N) and class probabilities
(`probs`: float array N x C, rows summing to 1). Outputs are plain Python floats/ints/dicts so they
serialise to JSON that DVC can read as metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from lensmith.errors import LensmithError


class EvaluationError(LensmithError):
    """Evaluation cannot run on these inputs (missing files, unknown labels, bad positive class...)."""


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(accuracy_score(y_true, y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    return float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="weighted", zero_division=0))


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the k most probable (k is capped at the class count)."""
    num_classes = probs.shape[1]
    value = multiclass_accuracy(
        torch.as_tensor(probs, dtype=torch.float32),
        torch.as_tensor(y_true, dtype=torch.long),
        num_classes=num_classes,
        average="micro",
        top_k=min(k, num_classes),
    )
    return float(value)


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """{label: {precision, recall, f1, support}}; a class never predicted has precision 0 (not NaN)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(classes)
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """C x C counts; rows are actual classes, columns predicted."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int) -> float:
    """Top-label ECE (L1) over `n_bins` equal-width confidence bins."""
    value = multiclass_calibration_error(
        torch.as_tensor(probs, dtype=torch.float32),
        torch.as_tensor(y_true, dtype=torch.long),
        num_classes=probs.shape[1],
        n_bins=n_bins,
        norm="l1",
    )
    return float(value)


def reliability_table(probs: np.ndarray, y_true: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per confidence bin: bin edges, mean confidence, accuracy and count (the reliability diagram's data)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Same binning as torchmetrics: a confidence equal to an upper edge belongs to that bin.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        rows.append(
            {
                "bin_lower": float(edges[b]),
                "bin_upper": float(edges[b + 1]),
                "confidence": float(confidence[in_bin].mean()) if count else float("nan"),
                "accuracy": float(correct[in_bin].mean()) if count else float("nan"),
                "count": count,
            }
        )
    return pd.DataFrame(rows)


# ---- positive class ("any defect" vs the good class) -------------------------------------------------


def positive_class_indices(classes: Sequence[str], positive_class: str | None, negative_class: str | None) -> list[int]:
    """Indices of the classes that count as positive.

    positive_class set -> just that class; null -> every class except negative_class (any defect vs ok);
    both null -> [] (no defect-vs-ok view: a set of digits or product types has no good class).
    """
    classes = list(classes)
    if positive_class is not None:
        if positive_class not in classes:
            raise EvaluationError(
                f"evaluate.positive_class={positive_class!r} is not a class of the model; classes: {', '.join(classes)}"
            )
        return [classes.index(positive_class)]
    if negative_class is None:
        return []
    if negative_class not in classes:
        raise EvaluationError(
            f"evaluate.negative_class={negative_class!r} is not a class of the model; classes: {', '.join(classes)} "
            "(set evaluate.positive_class or evaluate.negative_class to one of them)"
        )
    if len(classes) < 2:
        raise EvaluationError(f"a positive class needs at least two classes; the model has {classes}")
    return [i for i, name in enumerate(classes) if name != negative_class]


def positive_class_name(classes: Sequence[str], positive_indices: Sequence[int]) -> str:
    names = [classes[i] for i in positive_indices]
    return names[0] if len(names) == 1 else "any of " + "|".join(names)


def is_positive(labels: np.ndarray, positive_indices: Sequence[int]) -> np.ndarray:
    """Class indices -> bool array: True where the class is a positive one."""
    return np.isin(labels, list(positive_indices))


def positive_scores(probs: np.ndarray, positive_indices: Sequence[int]) -> np.ndarray:
    """P(positive) = summed probability of the positive classes."""
    return probs[:, list(positive_indices)].sum(axis=1)


def positive_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, positive_indices: Sequence[int]
) -> dict[str, float | None]:
    """ROC-AUC and average precision of P(positive); precision/recall of the argmax decision.

    roc_auc/average_precision are None when the test set holds only one of positive/negative.
    """
    truth = is_positive(y_true, positive_indices)
    decision = is_positive(y_pred, positive_indices)
    scores = positive_scores(probs, positive_indices)
    both_present = 0 < truth.sum() < len(truth)
    return {
        "roc_auc": float(roc_auc_score(truth, scores)) if both_present else None,
        "average_precision": float(average_precision_score(truth, scores)) if both_present else None,
        "recall": float(recall_score(truth, decision, zero_division=0)),
        "precision": float(precision_score(truth, decision, zero_division=0)),
        "support": int(truth.sum()),
    }


def curve_inputs(y_true: np.ndarray, probs: np.ndarray, positive_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(truth, score) pairs the PR/ROC curves are drawn from: P(positive) against is-positive, or with no
    positive classes the micro-average over classes (one-vs-rest: every image x class pair is one point)."""
    if positive_indices:
        return is_positive(y_true, positive_indices), positive_scores(probs, positive_indices)
    one_hot = np.eye(probs.shape[1], dtype=bool)[y_true]
    return one_hot.ravel(), probs.ravel()


def pr_curve_frame(y_true: np.ndarray, probs: np.ndarray, positive_indices: Sequence[int]) -> pd.DataFrame:
    """precision, recall, threshold per point (the last point, recall 0 / precision 1, has no threshold)."""
    precision, recall, thresholds = precision_recall_curve(*curve_inputs(y_true, probs, positive_indices))
    return pd.DataFrame(
        {"precision": precision[:-1], "recall": recall[:-1], "threshold": thresholds.astype(float)}
    )


def roc_curve_frame(y_true: np.ndarray, probs: np.ndarray, positive_indices: Sequence[int]) -> pd.DataFrame:
    """fpr, tpr, threshold per point (sklearn's first point has threshold inf: dropped, it is not JSON/CSV-friendly)."""
    fpr, tpr, thresholds = roc_curve(*curve_inputs(y_true, probs, positive_indices))
    frame = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds.astype(float)})
    return frame[np.isfinite(frame["threshold"])].reset_index(drop=True)


# ---- per slice -----------------------------------------------------------------------------------------


def true_positive_rate(truth: np.ndarray, decision: np.ndarray) -> float | None:
    """TPR among actual positives; None when there are none."""
    positives = truth.sum()
    return float((truth & decision).sum() / positives) if positives else None


def false_positive_rate(truth: np.ndarray, decision: np.ndarray) -> float | None:
    """FPR among actual negatives; None when there are none."""
    negatives = (~truth).sum()
    return float((~truth & decision).sum() / negatives) if negatives else None


def slice_value_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, positive_indices: Sequence[int]
) -> dict[str, Any]:
    truth = is_positive(y_true, positive_indices)
    decision = is_positive(y_pred, positive_indices)
    view = bool(positive_indices)  # no defect-vs-ok view: no TPR/FPR
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "tpr": true_positive_rate(truth, decision) if view else None,
        "fpr": false_positive_rate(truth, decision) if view else None,
    }


def largest_difference(values: Sequence[float | None]) -> float | None:
    """max - min over the defined values; None when fewer than two are defined."""
    defined = [v for v in values if v is not None]
    return float(max(defined) - min(defined)) if len(defined) >= 2 else None


def equalized_odds_gap(per_value: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Largest TPR difference and largest FPR difference between slice values, and the max of both."""
    tpr_gap = largest_difference([m["tpr"] for m in per_value.values()])
    fpr_gap = largest_difference([m["fpr"] for m in per_value.values()])
    defined = [g for g in (tpr_gap, fpr_gap) if g is not None]
    return {"tpr_gap": tpr_gap, "fpr_gap": fpr_gap, "equalized_odds_gap": max(defined) if defined else None}


def slice_metrics(
    slice_values: pd.Series,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    positive_indices: Sequence[int],
) -> dict[str, Any]:
    """{values: {value: metrics}, tpr_gap, fpr_gap, equalized_odds_gap} for one metadata column.

    Missing values form their own slice, "(missing)", so no image silently drops out.
    """
    keys = slice_values.astype("object").where(slice_values.notna(), "(missing)").astype(str).to_numpy()
    per_value = {
        value: slice_value_metrics(y_true[keys == value], y_pred[keys == value], num_classes, positive_indices)
        for value in sorted(set(keys))
    }
    return {"values": per_value, **equalized_odds_gap(per_value)}
