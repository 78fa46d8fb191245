"""Feedback becomes a live quality figure: each human correction of a served decision is an outcome (a caught or
missed defect, a false alarm, a correct ok), and the last N outcomes give a running estimate of the production
model's defect recall and false-alarm rate (Prometheus gauges in the service, a block in the drift report).

A caveat the reports repeat: people mostly correct what looked wrong or uncertain (the review queue holds
low-confidence and review-band images), so these figures lean pessimistic; they are an alarm, not a test set.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

OUTCOMES: tuple[str, ...] = ("caught", "missed", "false_alarm", "correct_ok", "reviewed", "not_scored")


def feedback_outcome(decision: str | None, true_label: str, positive_classes: Sequence[str]) -> str:
    """What one correction says about a served decision. `not_scored`: the model decides by argmax (no defect
    view) or the correction names no class."""
    if not positive_classes or decision not in ("defect", "ok", "review"):
        return "not_scored"
    if decision == "review":
        return "reviewed"
    is_defect = true_label in positive_classes
    if decision == "defect":
        return "caught" if is_defect else "false_alarm"
    return "missed" if is_defect else "correct_ok"


def quality_figures(outcomes: Iterable[str]) -> dict[str, Any]:
    """Recall and false-alarm rate of the decided outcomes (reviewed ones counted apart); None without data."""
    counts = Counter(outcomes)
    defects = counts["caught"] + counts["missed"]
    good = counts["false_alarm"] + counts["correct_ok"]
    return {
        "outcomes": {name: counts[name] for name in OUTCOMES},
        "defects": defects,
        "good": good,
        "defect_recall": counts["caught"] / defects if defects else None,
        "false_alarm_rate": counts["false_alarm"] / good if good else None,
    }


class LiveQuality:
    """The last `window` scored outcomes, thread-safe (feedback arrives on the event loop, /metrics reads)."""

    def __init__(self, window: int) -> None:
        self._outcomes: deque[str] = deque(maxlen=window)
        self._totals: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, outcome: str) -> None:
        with self._lock:
            self._totals[outcome] += 1
            if outcome != "not_scored":
                self._outcomes.append(outcome)

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return quality_figures(list(self._outcomes))

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {name: self._totals[name] for name in OUTCOMES}


def queue_quality(items: Iterable[dict[str, Any]], positive_classes: Sequence[str], floor: float | None) -> dict[str, Any]:
    """The live figures from the review queue's corrections (feedback items with a class), for the drift report;
    `below_floor` when the defect recall is under the gate's floor."""
    outcomes = [
        feedback_outcome((item.get("prediction") or {}).get("decision"), str(item["feedback_label"]), positive_classes)
        for item in items
        if item.get("reason") == "feedback" and item.get("feedback_label") not in (None, "wrong")
    ]
    figures = quality_figures(o for o in outcomes if o != "not_scored")
    recall = figures["defect_recall"]
    return {**figures, "floor": floor, "below_floor": recall is not None and floor is not None and recall < floor,
            "corrections": len(outcomes)}
