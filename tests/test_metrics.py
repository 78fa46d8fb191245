"""Metric functions against hand-computed values and scikit-learn on small arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from lensmith import metrics as m
from lensmith.metrics import EvaluationError

CLASSES = ["ok", "crack", "stain"]


def one_hot_probs(pred: list[int], confidence: float = 0.9, n: int = 3) -> np.ndarray:
    probs = np.full((len(pred), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def test_perfect_classifier_scores_one_everywhere() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = one_hot_probs(y.tolist())
    assert m.accuracy(y, y) == 1.0
    assert m.macro_f1(y, y, 3) == 1.0
    assert m.weighted_f1(y, y, 3) == 1.0
    assert m.top_k_accuracy(y, probs, 1) == 1.0
    assert all(v == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2} for v in m.per_class_metrics(y, y, CLASSES).values())
    positive = m.positive_class_metrics(y, y, probs, [1, 2])
    assert positive["roc_auc"] == 1.0 and positive["average_precision"] == 1.0
    assert positive["recall"] == 1.0 and positive["precision"] == 1.0 and positive["support"] == 4
    np.testing.assert_array_equal(m.confusion(y, y, 3), np.diag([2, 2, 2]))


def test_known_confusion_matches_hand_computed_values() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    per_class = m.per_class_metrics(y_true, y_pred, CLASSES)
    # ok: 2 of 3 found, no false alarms; crack: 1 of 2 found, 1 of 2 predictions right; stain: 1/1 found, 1 of 2 right
    assert per_class["ok"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert per_class["crack"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per_class["stain"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert m.macro_f1(y_true, y_pred, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m.weighted_f1(y_true, y_pred, 3) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    np.testing.assert_array_equal(m.confusion(y_true, y_pred, 3), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_class_never_seen_nor_predicted_is_zero_not_nan() -> None:
    y = np.array([0, 0, 1])
    per_class = m.per_class_metrics(y, y, CLASSES)
    assert per_class["stain"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_top_k_accuracy_counts_true_class_among_k_most_probable() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    y = np.array([0, 1, 2, 0])
    assert m.top_k_accuracy(y, probs, 1) == pytest.approx(1 / 4)
    assert m.top_k_accuracy(y, probs, 2) == pytest.approx(2 / 4)
    assert m.top_k_accuracy(y, probs, 3) == 1.0
    assert m.top_k_accuracy(y, probs, 10) == 1.0  # k above the class count is capped


def test_ece_matches_hand_computed_value_and_reliability_table() -> None:
    # two samples at confidence 0.9 (one right, one wrong), two at 0.6 (both right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.9 - 0.5) + 0.5 * abs(0.6 - 1.0)
    assert m.expected_calibration_error(probs, y, 10) == pytest.approx(expected, abs=1e-6)
    table = m.reliability_table(probs, y, 10)
    assert table["count"].sum() == 4 and len(table) == 10
    filled = table[table["count"] > 0]
    from_table = float((filled["count"] * (filled["confidence"] - filled["accuracy"]).abs()).sum() / 4)
    assert from_table == pytest.approx(expected)


def test_positive_class_indices() -> None:
    assert m.positive_class_indices(CLASSES, "crack", "ok") == [1]
    assert m.positive_class_indices(CLASSES, None, "ok") == [1, 2]
    assert m.positive_class_name(CLASSES, [1, 2]) == "any of crack|stain"
    with pytest.raises(EvaluationError, match="positive_class='dent'.*ok, crack, stain"):
        m.positive_class_indices(CLASSES, "dent", "ok")
    with pytest.raises(EvaluationError, match="negative_class='good'.*ok, crack, stain"):
        m.positive_class_indices(CLASSES, None, "good")
    assert m.positive_class_indices(CLASSES, None, None) == []  # no good class: no defect-vs-ok view


def test_curves_without_a_defect_view_are_the_micro_average_over_classes() -> None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    y_true = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4], [0.3, 0.4, 0.3], [0.4, 0.5, 0.1]])
    one_hot = np.eye(3, dtype=bool)[y_true]
    fpr, tpr, thresholds = roc_curve(one_hot.ravel(), probs.ravel())
    roc = m.roc_curve_frame(y_true, probs, [])
    assert roc["fpr"].tolist() == pytest.approx(fpr[1:].tolist()) and roc["tpr"].tolist() == pytest.approx(tpr[1:].tolist())
    precision, recall, _ = precision_recall_curve(one_hot.ravel(), probs.ravel())
    assert m.pr_curve_frame(y_true, probs, [])["precision"].tolist() == pytest.approx(precision[:-1].tolist())
    assert m.slice_value_metrics(y_true, probs.argmax(1), 3, [])["tpr"] is None


def test_any_defect_scores_and_curves_agree_with_sklearn() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=40)
    y = rng.integers(0, 3, size=40)
    scores = m.positive_scores(probs, [1, 2])
    np.testing.assert_allclose(scores, 1 - probs[:, 0])
    result = m.positive_class_metrics(y, probs.argmax(axis=1), probs, [1, 2])
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y != 0, scores))
    precision, recall, thresholds = precision_recall_curve(y != 0, scores)
    pr = m.pr_curve_frame(y, probs, [1, 2])
    assert list(pr.columns) == ["precision", "recall", "threshold"]
    np.testing.assert_allclose(pr["threshold"], thresholds)
    np.testing.assert_allclose(pr["precision"], precision[:-1])
    roc = m.roc_curve_frame(y, probs, [1, 2])
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and np.isfinite(roc.to_numpy()).all()


def test_single_kind_of_truth_gives_no_auc_instead_of_crashing() -> None:
    y = np.array([1, 2, 1])
    result = m.positive_class_metrics(y, y, one_hot_probs(y.tolist()), [1, 2])
    assert result["roc_auc"] is None and result["average_precision"] is None and result["recall"] == 1.0


def test_equalized_odds_gap_on_crafted_slices() -> None:
    # positive = class 1. Site A: 2 positives both caught, 2 negatives no false alarm -> TPR 1, FPR 0.
    # Site B: 2 positives one caught, 4 negatives one false alarm -> TPR 0.5, FPR 0.25.
    # Site C: negatives only, one false alarm -> TPR undefined (ignored), FPR 0.5.
    site = pd.Series(["A"] * 4 + ["B"] * 6 + ["C"] * 2)
    y_true = np.array([1, 1, 0, 0] + [1, 1, 0, 0, 0, 0] + [0, 0])
    y_pred = np.array([1, 1, 0, 0] + [1, 0, 1, 0, 0, 0] + [1, 0])
    result = m.slice_metrics(site, y_true, y_pred, 2, [1])
    assert result["values"]["A"]["tpr"] == 1.0 and result["values"]["A"]["fpr"] == 0.0
    assert result["values"]["B"]["tpr"] == 0.5 and result["values"]["B"]["fpr"] == 0.25
    assert result["values"]["C"]["tpr"] is None and result["values"]["C"]["fpr"] == 0.5
    assert result["values"]["B"]["n"] == 6 and result["values"]["B"]["accuracy"] == pytest.approx(4 / 6)
    assert result["tpr_gap"] == 0.5 and result["fpr_gap"] == 0.5 and result["equalized_odds_gap"] == 0.5


def test_equalized_odds_gap_takes_the_larger_of_tpr_and_fpr_gaps() -> None:
    gap = m.equalized_odds_gap({"a": {"tpr": 0.9, "fpr": 0.1}, "b": {"tpr": 0.8, "fpr": 0.4}})
    assert gap["tpr_gap"] == pytest.approx(0.1) and gap["fpr_gap"] == pytest.approx(0.3)
    assert gap["equalized_odds_gap"] == pytest.approx(0.3)
    assert m.equalized_odds_gap({"only": {"tpr": 1.0, "fpr": 0.0}})["equalized_odds_gap"] is None


def test_missing_slice_values_form_their_own_slice() -> None:
    site = pd.Series(["A", None, "A"])
    result = m.slice_metrics(site, np.array([0, 1, 1]), np.array([0, 1, 0]), 2, [1])
    assert set(result["values"]) == {"A", "(missing)"}
    assert result["values"]["(missing)"]["n"] == 1
