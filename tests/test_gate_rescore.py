"""The gate compares like with like: production is scored again on today's test split through its own ONNX file at
its own operating point; its stored metrics (from the split it was evaluated on) are only the fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from servekit import copy_project

from lensmith.gate import run_gate
from lensmith.layout import Layout
from lensmith.params import params_from_dict
from lensmith.registry import Registry

pytestmark = pytest.mark.timeout(600)


def metrics_for(classes: list[str], macro_f1: float) -> dict[str, Any]:
    """A metrics.json that passes every floor, with this macro F1."""
    per_class = {c: {"precision": macro_f1, "recall": macro_f1, "f1": macro_f1, "support": 10} for c in classes}
    return {
        "test": {"n": 50, "accuracy": macro_f1, "macro_f1": macro_f1, "per_class": per_class, "positive_class": None},
        "calibration": {"ece": 0.01, "bins": 15},
        "slices": {},
        "robustness": {"clean_accuracy": macro_f1, "mean_relative_drop": 0.01, "perturbations": {}},
        "throughput": {"images_per_s": 100.0, "latency_ms_p95": 5.0},
    }


@pytest.fixture
def project(tmp_path: Path) -> Layout:
    """Production: the exported (random-weight) model, stored with glowing metrics from an older, easier split."""
    layout = copy_project(tmp_path)
    classes = json.loads((layout.candidate / "meta.json").read_text())["classes"]
    stored = tmp_path / "stored_metrics.json"
    stored.write_text(json.dumps(metrics_for(classes, 0.99)))
    gated = tmp_path / "gate.json"  # it passed its own gate back then (floors only: the first model)
    gated.write_text(json.dumps({"passed": True, "decision": "promote", "champion_version": None, "reasons": []}))
    registry = Registry(layout.models)
    version = registry.register(layout.candidate, metrics_path=stored, gate_path=gated, export_path=layout.exported / "export.json")
    registry.promote(version)
    (layout.reports / "metrics.json").write_text(json.dumps(metrics_for(classes, 0.80)))  # the candidate
    return layout


def gate_params() -> Any:
    # this test is about the headline comparison: per-class and slice regressions are other tests' business
    return params_from_dict({"gate": {"max_regression": 1.0, "min_macro_f1": 0.5, "min_accuracy": 0.5}})


def test_production_is_rescored_on_todays_split_and_the_better_candidate_wins(project: Layout) -> None:
    result = run_gate(gate_params(), project, raise_on_reject=False)
    report = json.loads((project.reports / "gate.json").read_text())
    assert report["champion_compared"] == "re-scored on this test split" and report["champion_rescore_seconds"] > 0
    improvement = next(c for c in report["checks"] if c["name"].startswith("champion.improvement"))
    assert improvement["threshold"] < 0.6, "production's real macro F1 on today's split (random weights), not its stored 0.99"
    assert result.passed, result.reasons
    same_split = next(c for c in report["checks"] if c["name"] == "champion.same_test_split")
    assert same_split["passed"] and "re-scored" in same_split["detail"]


def test_production_is_rescored_through_evaluate_providers(project: Layout) -> None:
    from lensmith.champion import rescore_production

    folder = Registry(project.models).resolve("production")
    rescored = rescore_production(gate_params(), project, folder)
    assert rescored.metrics is not None, rescored.why_not
    assert rescored.metrics["served"]["provider"] == "CPUExecutionProvider"  # evaluate.providers auto, no GPU here


def test_when_production_cannot_be_loaded_the_stored_metrics_decide_and_the_report_says_so(project: Layout) -> None:
    folder = Registry(project.models).resolve("production")
    for onnx in folder.glob("*.onnx"):
        onnx.unlink()
    result = run_gate(gate_params(), project, raise_on_reject=False)
    report = json.loads((project.reports / "gate.json").read_text())
    assert report["champion_compared"] == "stored metrics"
    assert any("could not be scored on this test split" in w for w in report["warnings"])
    assert not result.passed and any("champion.improvement" in r for r in result.reasons)  # 0.80 < stored 0.99


def test_missed_defects_and_false_alarms_are_compared_at_each_models_operating_point() -> None:
    from lensmith.gate import plant_checks
    from lensmith.params import GateParams

    def figures(missed: int, false_alarms: int) -> dict[str, Any]:
        return {"decision": {"test": {"n": 100, "defects": 40, "missed_defects": missed, "false_alarms": false_alarms,
                                      "false_alarm_rate": false_alarms / 60}}}

    plant = GateParams(min_false_negative_reduction=0.3, max_false_positive_increase=0.05)
    passed = {c.name: c.passed for c in plant_checks(figures(7, 6), figures(10, 6), plant)}
    assert passed == {"champion.missed_defect_rate": True, "champion.false_alarm_rate": True}  # 30% fewer misses
    passed = {c.name: c.passed for c in plant_checks(figures(8, 6), figures(10, 6), plant)}
    assert passed["champion.missed_defect_rate"] is False  # only 20% fewer
    passed = {c.name: c.passed for c in plant_checks(figures(5, 7), figures(10, 6), plant)}
    assert passed["champion.false_alarm_rate"] is False  # 7 > 6 x 1.05
    argmax = plant_checks({"decision": {"rule": {"kind": "argmax"}}}, figures(1, 1), plant)
    assert all(c.passed and not c.blocking for c in argmax)


def test_a_throughput_floor_is_a_gate_check(project: Layout) -> None:
    params = params_from_dict({"gate": {"max_regression": 1.0, "min_macro_f1": 0.5, "min_accuracy": 0.5,
                                        "min_images_per_s": 1000.0, "max_latency_ms": 1.0}})
    result = run_gate(params, project, raise_on_reject=False)
    assert not result.passed
    assert {"floor.min_images_per_s", "floor.max_latency_ms"} <= {c.name for c in result.checks if not c.passed}


def test_the_rule_travels_with_the_registered_version(project: Layout) -> None:
    """meta.json and the model card of a registry version carry the rule its ONNX files decide with."""
    folder = Registry(project.models).resolve("production")
    rule = json.loads((project.exported / "export.json").read_text())["decision"]["rule"]
    assert json.loads((folder / "meta.json").read_text())["decision"] == rule
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Decision rule" in card
