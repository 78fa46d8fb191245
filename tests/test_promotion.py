"""After the gate: register + promote when it passed, keep production when it rejected, never register twice."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.layout import Layout
from lensmith.promotion import promote_if_passed
from lensmith.registry import Registry, RegistryError
from test_registry import gate_doc, metrics_doc

CLASSES = ["crack", "ok", "scratch"]


def gated_candidate(root: Path, *, weights: bytes, passed: bool) -> Layout:
    """models/candidate + reports/{metrics,gate}.json as the pipeline leaves them (gated against the current production)."""
    layout = Layout(root)
    production = Registry(layout.models).aliases()["production"]
    if layout.candidate.exists():
        shutil.rmtree(layout.candidate)
    layout.candidate.mkdir(parents=True)
    layout.reports.mkdir(parents=True, exist_ok=True)
    (layout.candidate / "model.pt").write_bytes(weights)
    sha = hashlib.sha256(weights).hexdigest()
    (layout.candidate / "meta.json").write_text(json.dumps({"arch": "efficientnet_lite0", "classes": CLASSES, "weights_sha256": sha}))
    (layout.reports / "metrics.json").write_text(json.dumps(metrics_doc()))
    (layout.reports / "gate.json").write_text(json.dumps(gate_doc(passed, sha, production)))
    return layout


def test_a_passed_candidate_is_registered_and_promoted_once(tmp_path: Path) -> None:
    layout = gated_candidate(tmp_path, weights=b"w1", passed=True)
    first = promote_if_passed(layout)
    assert (first.version, first.registered, first.promoted) == ("v0001", True, True)
    again = promote_if_passed(layout)  # a rerun with nothing changed
    assert (again.version, again.registered, again.promoted) == ("v0001", False, False)
    assert "already registered" in again.note
    assert Registry(layout.models).version_ids() == ["v0001"]


def test_a_rejected_candidate_keeps_production(tmp_path: Path) -> None:
    promote_if_passed(gated_candidate(tmp_path, weights=b"w1", passed=True))
    decision = promote_if_passed(gated_candidate(tmp_path, weights=b"w2", passed=False))
    assert (decision.passed, decision.version, decision.promoted) == (False, None, False)
    assert "production kept (v0001)" in decision.note and decision.reasons
    assert Registry(tmp_path / "models").aliases()["production"] == "v0001"


def test_a_rerun_does_not_undo_a_rollback(tmp_path: Path) -> None:
    promote_if_passed(gated_candidate(tmp_path, weights=b"w1", passed=True))
    layout = gated_candidate(tmp_path, weights=b"w2", passed=True)
    promote_if_passed(layout)
    registry = Registry(layout.models)
    assert registry.rollback() == "v0001"
    assert promote_if_passed(layout).promoted is False
    assert registry.aliases()["production"] == "v0001"


def test_no_gate_decision_is_a_clear_error(tmp_path: Path) -> None:
    layout = gated_candidate(tmp_path, weights=b"w1", passed=True)
    (layout.reports / "gate.json").unlink()
    with pytest.raises(RegistryError, match="no gate decision"):
        promote_if_passed(layout)


def test_models_register_cli(tmp_path: Path) -> None:
    gated_candidate(tmp_path, weights=b"w1", passed=True)
    result = CliRunner().invoke(app, ["models", "register", "--no-promote", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "registered v0001; not promoted" in result.stdout
    assert Registry(tmp_path / "models").aliases()["production"] is None
    gated_candidate(tmp_path, weights=b"w2", passed=False)
    rejected = CliRunner().invoke(app, ["models", "register", "--root", str(tmp_path)])
    assert rejected.exit_code == 1 and "gate rejected" in rejected.stdout
