"""End to end through the CLI, Prefect (ephemeral) and DVC on tiny real demo data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from project import make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("e2e") / "proj")
    proc = run([sys.executable, "-m", "lensmith.cli", "run"], root, timeout=1200)
    assert "reports:" in proc.stdout
    return root


def lensmith_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lensmith.cli", *args]


def test_flow_run_produces_reports_and_a_clean_dvc_status(project: Path) -> None:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert json.loads((project / "reports" / "validation.json").read_text())["success"] is True
    for name in ("train", "val", "test"):
        assert (project / "data" / "splits" / f"{name}.parquet").exists()
    status = run([sys.executable, "-m", "dvc", "status", "--json"], project)
    assert status.stdout.strip() == "{}", status.stdout


def test_dvc_repro_after_flow_has_nothing_to_do(project: Path) -> None:
    proc = run([sys.executable, "-m", "dvc", "repro"], project)
    assert "Running stage" not in proc.stdout
    assert "up to date" in proc.stdout.lower()


def test_second_flow_run_skips_every_stage(project: Path) -> None:
    proc = run(lensmith_cmd("run"), project)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ") and "(" in line]
    assert lines and all("unchanged" in line for line in lines if not line.strip().startswith(("validation", "evaluation", "metrics"))), proc.stdout


def test_set_override_reruns_only_downstream_and_restores_params(project: Path) -> None:
    before = (project / "params.yaml").read_bytes()
    proc = run(lensmith_cmd("run", "--set", "evaluate.top_k=2"), project)
    stage_lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ") and "(" in line}
    assert "ran" in stage_lines["evaluate"], proc.stdout
    for upstream in ("ingest", "validate", "split", "train"):
        assert "unchanged" in stage_lines[upstream], proc.stdout
    assert (project / "params.yaml").read_bytes() == before
