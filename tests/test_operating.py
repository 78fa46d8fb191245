"""The operating point against hand-computed cases (scores in sixteenths: exact in binary floating point)."""

from __future__ import annotations

import numpy as np
import pytest

from lensmith.errors import DataError
from lensmith.operating import (
    OperatingPoint,
    choose_operating_point,
    choose_threshold,
    defect_scores,
    figures_at,
    review_band,
)

# four defects, five ok images
SCORES = np.array([14, 12, 10, 6, 11, 5, 4, 2, 1]) / 16
IS_DEFECT = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)


def threshold(target: str, min_recall: float | None = None, max_far: float | None = None, cost: float = 10.0) -> float:
    return choose_threshold(IS_DEFECT, SCORES, target, min_recall, max_far, cost)  # type: ignore[arg-type]


def test_min_recall_takes_the_highest_threshold_that_catches_enough() -> None:
    assert threshold("min_recall", 0.75) == 10 / 16  # 3 of 4 defects; the ok at 11/16 is the one false alarm
    assert threshold("min_recall", 0.5) == 12 / 16
    assert threshold("min_recall", 1.0) == 6 / 16
    assert threshold("min_recall", 0.0) > 1.0 - 1e-9  # nothing needs catching: flag nothing


def test_max_false_alarm_rate_takes_the_lowest_threshold_within_budget() -> None:
    assert threshold("max_false_alarm_rate", max_far=0.0) == 12 / 16  # just above the highest ok score (11/16)
    assert threshold("max_false_alarm_rate", max_far=0.2) == 6 / 16  # one ok of five may be flagged
    assert threshold("max_false_alarm_rate", max_far=1.0) == 1 / 16


def test_min_cost_weighs_misses_against_false_alarms_and_breaks_ties_upwards() -> None:
    assert threshold("min_cost", cost=10.0) == 6 / 16  # 0 missed + 1 false alarm
    assert threshold("min_cost", cost=0.1) == 12 / 16  # misses are cheap: 2 missed (0.2) and no false alarm
    # cost 0.5: 12/16 (2 missed = 1.0) and 6/16 (1 false alarm = 1.0) tie: the higher threshold wins
    assert threshold("min_cost", cost=0.5) == 12 / 16


def test_tied_scores_are_flagged_together() -> None:
    scores, truth = np.array([0.5, 0.5, 0.25]), np.array([True, False, False])
    assert choose_threshold(truth, scores, "min_recall", 1.0, None, 1.0) == 0.5
    point = OperatingPoint(0.5, 0.5, 0.5, "min_recall", 1.0, None, 1.0, 0.0)
    assert figures_at(point, truth, scores)["false_alarm_rate"] == 0.5


def test_a_target_that_cannot_be_met_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"no threshold meets both.*best defect recall is 0.500"):
        threshold("min_recall", 1.0, max_far=0.0)
    with pytest.raises(DataError, match="no defect images"):
        choose_threshold(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]), "min_recall", 0.9, None, 1.0)
    with pytest.raises(DataError, match="no ok images"):
        choose_threshold(np.ones(3, bool), np.array([0.1, 0.2, 0.3]), "min_recall", 0.9, None, 1.0)


def test_review_band_holds_the_images_closest_to_the_threshold() -> None:
    assert review_band(SCORES, 10 / 16, 0.0) == (10 / 16, 10 / 16)
    low, high = review_band(SCORES, 10 / 16, 0.25)  # ceil(0.25 * 9) = 3 closest: 10/16, 11/16, 12/16
    assert low == 8 / 16 and 12 / 16 < high < 12 / 16 + 1e-9
    point = choose_operating_point(IS_DEFECT, SCORES, "min_recall", 0.75, None, 10.0, 0.25)
    assert [point.decide(s) for s in SCORES] == ["defect", "review", "review", "ok", "review", "ok", "ok", "ok", "ok"]


def test_figures_at_the_point() -> None:
    point = choose_operating_point(IS_DEFECT, SCORES, "min_recall", 0.75, None, 10.0, 0.0)
    figures = figures_at(point, IS_DEFECT, SCORES)
    assert figures["recall"] == 0.75 and figures["false_alarm_rate"] == 0.2 and figures["precision"] == 0.75
    assert figures["missed_defects"] == 1 and figures["false_alarms"] == 1 and figures["expected_cost"] == 11.0
    banded = choose_operating_point(IS_DEFECT, SCORES, "min_recall", 0.75, None, 10.0, 0.25)
    figures = figures_at(banded, IS_DEFECT, SCORES)
    assert figures["recall"] == 0.25 and figures["recall_with_review"] == 0.75 and figures["review_rate"] == 3 / 9
    assert figures["false_alarm_rate"] == 0.0


def test_the_point_round_trips_and_scores_come_from_probabilities() -> None:
    point = choose_operating_point(IS_DEFECT, SCORES, "max_false_alarm_rate", None, 0.2, 10.0, 0.1)
    assert OperatingPoint.from_dict(point.as_dict()) == point
    probabilities = np.array([[0.75, 0.25], [0.125, 0.875]])  # column 0 is the ok class
    assert defect_scores(probabilities, 0).tolist() == [0.25, 0.875]
