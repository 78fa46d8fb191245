"""The model gate: floors, champion/challenger improvement and regressions, test-split flag, int8 parity, reports, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import GateFailedError
from lensmith.gate import GateResult, run_gate
from lensmith.layout import Layout
from lensmith.params import Params, params_from_dict
from lensmith.registry import Registry, RegistryError

CLASSES = ["crack", "ok", "scratch"]
TEST_SPLIT_HASH = "a" * 64


def metrics_doc(
    macro_f1: float = 0.90, recalls: dict[str, float] | None = None, slices: dict[str, float] | None = None
) -> dict[str, Any]:
    recalls = {"crack": 0.90, "ok": 0.92, "scratch": 0.88, **(recalls or {})}
    slices = {"A": 0.91, "B": 0.89, **(slices or {})}
    return {
        "test": {
            "n": 150,
            "accuracy": 0.91,
            "macro_f1": macro_f1,
            "per_class": {c: {"precision": 0.9, "recall": r, "f1": 0.9, "support": 50} for c, r in recalls.items()},
            "positive_class": {"name": "crack", "recall": recalls["crack"], "precision": 0.9, "roc_auc": 0.97, "average_precision": 0.95},
        },
        "calibration": {"ece": 0.03, "bins": 15},
        "slices": {
            "site": {
                "values": {v: {"n": 60, "accuracy": a, "macro_f1": a, "tpr": a, "fpr": 0.05} for v, a in slices.items()},
                "equalized_odds_gap": 0.02,
            }
        },
        "robustness": {"clean_accuracy": 0.91, "mean_relative_drop": 0.06, "perturbations": {}},
        "throughput": {"images_per_s": 100.0},
    }


def params(**gate: Any) -> Params:
    return params_from_dict({"gate": gate})


class Project:
    """A tmp project root with a candidate, its metrics and (optionally) a production model in the registry."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self.registry = Registry(self.layout.models)
        self._seed = 0

    def candidate(self, metrics: dict[str, Any] | None, *, test_hash: str = TEST_SPLIT_HASH) -> None:
        self._seed += 1
        self.layout.candidate.mkdir(parents=True, exist_ok=True)
        weights = f"weights-{self._seed}".encode()
        (self.layout.candidate / "model.pt").write_bytes(weights)
        meta = {
            "classes": CLASSES,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "data_hash": {"data/splits/test.parquet": test_hash, "combined": "c" * 64},
        }
        (self.layout.candidate / "meta.json").write_text(json.dumps(meta))
        self.layout.reports.mkdir(parents=True, exist_ok=True)
        path = self.layout.reports / "metrics.json"
        if metrics is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(metrics))

    def gate(self, p: Params | None = None, *, expect_pass: bool = True) -> GateResult:
        if expect_pass:
            return run_gate(p or params(), self.layout)
        with pytest.raises(GateFailedError) as info:
            run_gate(p or params(), self.layout)
        assert "gate rejected the candidate" in str(info.value)
        return run_gate(p or params(), self.layout, raise_on_reject=False)

    def register_current(self) -> str:
        return self.registry.register(
            self.layout.candidate,
            metrics_path=self.layout.reports / "metrics.json",
            gate_path=self.layout.reports / "gate.json",
        )

    def production(self, metrics: dict[str, Any], *, test_hash: str = TEST_SPLIT_HASH) -> str:
        """Gate, register and promote a model with these metrics."""
        self.candidate(metrics, test_hash=test_hash)
        self.gate()
        version = self.register_current()
        self.registry.promote(version)
        return version

    def report(self) -> dict[str, Any]:
        return json.loads((self.layout.reports / "gate.json").read_text())


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def failed_names(result: GateResult) -> set[str]:
    return {c.name for c in result.checks if not c.passed and c.blocking}


# ---- floors ---------------------------------------------------------------------------------------


def test_first_model_passes_on_floors_alone_and_reports_every_check(project: Project) -> None:
    project.candidate(metrics_doc())
    result = project.gate()
    assert result.passed and result.champion_version is None
    report = project.report()
    assert report["passed"] is True and report["decision"] == "promote" and report["reasons"] == []
    assert report["champion_version"] is None
    for check in report["checks"]:
        assert {"name", "value", "threshold", "comparison", "passed"} <= set(check)
    names = {c["name"] for c in report["checks"]}
    assert {"floor.min_accuracy", "floor.min_macro_f1", "floor.min_positive_recall", "floor.max_ece", "floor.max_robustness_drop"} <= names
    assert {"floor.min_slice_accuracy[site=A]", "floor.min_slice_accuracy[site=B]"} <= names
    assert not any(n.startswith("champion.") for n in names)
    html = (project.layout.reports / "gate.html").read_text()
    assert "PASSED" in html and "<script" not in html and "https://" not in html


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("key", "value", "failed_check"),
    [
        ("test.accuracy", 0.5, "floor.min_accuracy"),
        ("test.macro_f1", 0.5, "floor.min_macro_f1"),
        ("test.positive_class.recall", 0.6, "floor.min_positive_recall"),
        ("calibration.ece", 0.2, "floor.max_ece"),
        ("robustness.mean_relative_drop", 0.4, "floor.max_robustness_drop"),
        ("slices.site.values.B.accuracy", 0.5, "floor.min_slice_accuracy[site=B]"),
    ],
)
def test_each_floor_rejects(project: Project, key: str, value: float, failed_check: str) -> None:
    project.candidate(_set(metrics_doc(), key, value))
    result = project.gate(expect_pass=False)
    assert failed_names(result) == {failed_check}
    report = project.report()
    assert report["passed"] is False and report["decision"] == "reject"
    assert len(report["reasons"]) == 1 and report["reasons"][0].startswith(failed_check)
    check = next(c for c in report["checks"] if c["name"] == failed_check)
    assert check["value"] == pytest.approx(value) and check["passed"] is False


def test_missing_metrics_fail_by_name_instead_of_crashing(project: Project) -> None:
    doc = metrics_doc()
    del doc["calibration"]
    del doc["test"]["positive_class"]
    project.candidate(doc)
    result = project.gate(expect_pass=False)
    assert failed_names(result) == {"floor.max_ece", "floor.min_positive_recall"}
    assert any("calibration.ece is missing" in r for r in result.reasons)
    project.candidate(None)
    result = project.gate(expect_pass=False)
    assert "floor.min_accuracy" in failed_names(result)
    assert any("metrics.json is missing" in w for w in result.warnings)


def test_defect_floors_do_not_apply_without_a_defect_view(project: Project) -> None:
    doc = metrics_doc()
    doc["test"]["positive_class"] = None  # evaluation found no good class (digits, product types)
    doc["slices"] = {}
    project.candidate(doc)
    result = project.gate()
    recall = next(c for c in project.report()["checks"] if c["name"] == "floor.min_positive_recall")
    assert result.passed and recall["blocking"] is False and "does not apply" in recall["detail"]


def test_small_slices_are_reported_but_not_gated(project: Project) -> None:
    doc = metrics_doc(slices={"C": 0.2})
    doc["slices"]["site"]["values"]["C"]["n"] = 3
    project.candidate(doc)
    result = project.gate(params(min_slice_n=10))
    small = next(c for c in result.checks if c.name == "floor.min_slice_accuracy[site=C]")
    assert result.passed and not small.passed and not small.blocking


# ---- champion / challenger ------------------------------------------------------------------------


def test_challenger_must_beat_production_by_min_improvement(project: Project) -> None:
    champion = project.production(metrics_doc(macro_f1=0.90))
    p = params(min_improvement=0.01)
    project.candidate(metrics_doc(macro_f1=0.905))
    result = project.gate(p, expect_pass=False)
    assert result.champion_version == champion
    assert failed_names(result) == {"champion.improvement[test.macro_f1]"}
    check = next(c for c in project.report()["checks"] if c["name"] == "champion.improvement[test.macro_f1]")
    assert check["threshold"] == pytest.approx(0.91) and check["comparison"] == ">="
    project.candidate(metrics_doc(macro_f1=0.92))
    assert project.gate(p).passed
    assert project.report()["champion_version"] == champion


def test_a_class_recall_regression_rejects_despite_better_headline(project: Project) -> None:
    project.production(metrics_doc(macro_f1=0.90))
    project.candidate(metrics_doc(macro_f1=0.95, recalls={"scratch": 0.80}))
    result = project.gate(params(max_regression=0.02), expect_pass=False)
    assert failed_names(result) == {"champion.recall_regression[scratch]"}
    project.candidate(metrics_doc(macro_f1=0.95, recalls={"scratch": 0.87}))
    assert project.gate(params(max_regression=0.02)).passed


def test_a_slice_accuracy_regression_rejects(project: Project) -> None:
    project.production(metrics_doc(macro_f1=0.90))
    project.candidate(metrics_doc(macro_f1=0.95, slices={"A": 0.85}))
    result = project.gate(params(max_regression=0.02), expect_pass=False)
    assert failed_names(result) == {"champion.slice_regression[site=A]"}


def test_a_different_test_split_is_flagged_and_optionally_rejected(project: Project) -> None:
    project.production(metrics_doc(macro_f1=0.90), test_hash="b" * 64)
    project.candidate(metrics_doc(macro_f1=0.92))
    result = project.gate()
    assert result.passed
    assert any("different test split" in w for w in project.report()["warnings"])
    split = next(c for c in project.report()["checks"] if c["name"] == "champion.same_test_split")
    assert split["passed"] is False and split["blocking"] is False
    result = project.gate(params(require_same_test_split=True), expect_pass=False)
    assert failed_names(result) == {"champion.same_test_split"}


def test_the_test_split_file_on_disk_is_what_the_candidate_is_compared_with(project: Project) -> None:
    project.production(metrics_doc(macro_f1=0.90))
    project.candidate(metrics_doc(macro_f1=0.92))
    project.layout.split_file("test").parent.mkdir(parents=True)
    project.layout.split_file("test").write_bytes(b"a new test split")
    project.gate(params(require_same_test_split=True), expect_pass=False)


def test_production_without_readable_metrics_rejects(project: Project) -> None:
    version = project.production(metrics_doc())
    metrics_file = project.registry.resolve(version) / "metrics.json"
    metrics_file.chmod(0o644)
    metrics_file.write_text("{not json")
    project.candidate(metrics_doc(macro_f1=0.95))
    result = project.gate(expect_pass=False)
    assert "champion.metrics" in failed_names(result)


# ---- int8 parity ----------------------------------------------------------------------------------


def write_export(project: Project, export: dict[str, Any]) -> None:
    (project.layout.reports / "export.json").write_text(json.dumps(export))


def test_int8_served_within_limit_passes_and_beyond_rejects(project: Project) -> None:
    project.candidate(metrics_doc())
    write_export(project, {"serving": "int8", "fp32": {"accuracy": 0.91}, "int8": {"accuracy": 0.905, "max_drop": 0.01}})
    result = project.gate()
    assert any(c.name == "floor.int8_parity" and c.passed for c in result.checks)
    write_export(project, {"serving": "int8", "fp32": {"accuracy": 0.91}, "int8": {"accuracy": 0.88, "max_drop": 0.01}})
    assert failed_names(project.gate(expect_pass=False)) == {"floor.int8_parity"}
    write_export(project, {"serving": {"precision": "int8"}, "int8": {"accuracy_drop": 0.005}})
    assert project.gate(params(int8_max_drop=0.01)).passed


def test_int8_served_without_figures_is_a_failed_check(project: Project) -> None:
    project.candidate(metrics_doc())
    write_export(project, {"serving": "model.int8.onnx"})
    result = project.gate(expect_pass=False)
    assert failed_names(result) == {"floor.int8_parity"}


def test_fp32_serving_needs_no_int8_check(project: Project) -> None:
    project.candidate(metrics_doc())
    write_export(project, {"serving": "fp32", "int8": {"accuracy": 0.1}})
    result = project.gate()
    assert not any(c.name == "floor.int8_parity" for c in result.checks)


def export_report(project: Project, *, drop: float, kept: bool = True, weights: str | None = None) -> dict[str, Any]:
    """The export stage's report format (lensmith/export.py)."""
    meta = json.loads((project.layout.candidate / "meta.json").read_text())
    return {
        "metadata": {"lensmith.weights_sha256": weights or meta["weights_sha256"]},
        "accuracy": {"fp32": 0.91, "int8": 0.91 - drop, "n_test": 150},
        "int8": {"decision": "int8 kept" if kept else "int8 rejected", "kept": kept, "accuracy": 0.91 - drop, "accuracy_drop": drop},
        "serving_variant": "int8",
    }


def test_export_stage_report_uses_the_export_int8_limit(project: Project) -> None:
    project.candidate(metrics_doc())
    write_export(project, export_report(project, drop=0.005))
    result = project.gate()  # limit from params export.int8_max_drop (0.01)
    parity = next(c for c in result.checks if c.name == "floor.int8_parity")
    assert parity.value == pytest.approx(0.005) and parity.threshold == pytest.approx(0.01)
    write_export(project, export_report(project, drop=0.03))
    assert failed_names(project.gate(expect_pass=False)) == {"floor.int8_parity"}
    write_export(project, export_report(project, drop=0.005, kept=False))
    assert "export.json serves int8 although" in project.gate(expect_pass=False).reasons[0]


def test_a_stale_export_report_for_other_weights_is_ignored_with_a_warning(project: Project) -> None:
    project.candidate(metrics_doc())
    write_export(project, export_report(project, drop=0.5, weights="f" * 64))
    result = project.gate()
    assert not any(c.name == "floor.int8_parity" for c in result.checks)
    assert any("made from other weights" in w for w in project.report()["warnings"])


# ---- a rejected model is never promoted -----------------------------------------------------------


def test_a_rejected_candidate_is_never_promoted_via_api_or_cli(project: Project) -> None:
    champion = project.production(metrics_doc(macro_f1=0.90))
    project.candidate(metrics_doc(macro_f1=0.80))
    project.gate(expect_pass=False)
    rejected = project.register_current()
    with pytest.raises(RegistryError, match="gate rejected it"):
        project.registry.promote(rejected)
    result = CliRunner().invoke(app, ["models", "promote", rejected, "--root", str(project.layout.root)])
    assert result.exit_code == 1 and "gate rejected it" in result.output
    assert project.registry.aliases()["production"] == champion


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_gate_exit_codes(project: Project, tmp_path: Path) -> None:
    no_params = str(tmp_path / "absent-params.yaml")  # missing file = defaults
    project.candidate(metrics_doc())
    ok = CliRunner().invoke(app, ["gate", "--params", no_params, "--root", str(project.layout.root)])
    assert ok.exit_code == 0, ok.output
    assert "gate promote" in ok.output
    project.candidate(_set(metrics_doc(), "test.positive_class.recall", 0.1))
    bad = CliRunner().invoke(app, ["gate", "--params", no_params, "--root", str(project.layout.root)])
    assert bad.exit_code == 1 and "floor.min_positive_recall" in bad.output and "Traceback" not in bad.output
    assert project.report()["decision"] == "reject"
