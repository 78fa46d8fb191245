"""Choosing the decision rule a model is served with, from params and the validation split's probabilities of the
model that is served (lensmith.operating holds the rule and the threshold arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lensmith import metrics as m
from lensmith.operating import DecisionRule, argmax_rule, choose_operating_point, figures_at
from lensmith.params import AUTO, Params
from lensmith.resolve import negative_class_of


def negative_class_for(params: Params, classes: Sequence[str]) -> str | None:
    """evaluate.negative_class as the model's classes resolve it (auto: a label named ok/good/normal/...)."""
    ev = params.evaluate
    if ev.negative_class == AUTO:
        return None if ev.positive_class is not None else negative_class_of(classes)
    return ev.negative_class


def defect_view(params: Params, classes: Sequence[str]) -> tuple[str | None, list[int]]:
    """(negative class, indices of the positive classes); no positive classes = no defect-vs-ok view."""
    negative = negative_class_for(params, classes)
    return negative, m.positive_class_indices(classes, params.evaluate.positive_class, negative)


def choose_decision_rule(
    params: Params, classes: Sequence[str], probabilities: np.ndarray, y_true: np.ndarray
) -> tuple[DecisionRule, dict[str, Any]]:
    """The rule, and how the validation split looks under it (figures at the point; empty for argmax)."""
    op = params.evaluate.operating_point
    names = tuple(str(c) for c in classes)
    negative, positives = defect_view(params, names)
    if not positives or op.target == "argmax":
        return argmax_rule(names, op.min_confidence), {}
    is_defect = m.is_positive(y_true, positives)
    if is_defect.all() or not is_defect.any():
        missing = "defect" if not is_defect.any() else "good"
        note = (f"the validation split has no {missing} images ({len(is_defect)} in all): no threshold can be chosen on "
                "it, so argmax decides; give validation both kinds (more data, or a larger split.val)")
        return argmax_rule(names, op.min_confidence), {"note": note}
    scores = m.positive_scores(probabilities, positives)
    point = choose_operating_point(
        is_defect, scores, op.target, op.min_recall, op.max_false_alarm_rate, op.cost_ratio, op.review_rate
    )
    rule = DecisionRule("threshold", names, negative, tuple(names[i] for i in positives), point)
    return rule, figures_at(point, is_defect, scores)
