"""End to end through the CLI, Prefect (ephemeral) and DVC on tiny real demo data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lensmith.testing.project import make_project, run

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


def test_unreachable_prefect_server_is_a_clear_error(project: Path) -> None:
    from lensmith.procutil import free_port
    from lensmith.testing.project import tool_env

    env = tool_env({"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"})
    proc = run(lensmith_cmd("run"), project, env=env, check=False)
    assert proc.returncode == 1
    assert "is unreachable" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_dvc_lock_is_a_clear_error_and_nothing_is_lost(project: Path) -> None:
    lock = project / "dvc.lock"
    original = lock.read_bytes()
    lock.write_bytes(b"<<<<<<< HEAD\nschema: '2.0'\n=======\n>>>>>>> other\n" + original)
    try:
        proc = run(lensmith_cmd("run"), project, check=False)
        assert proc.returncode == 1
        # DVC reads the lock while resolving the flow's graph: the run stops before any stage, naming the file
        assert "cannot be read" in proc.stderr and "'dvc.lock'" in proc.stderr and "corrupted" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert (project / "models" / "candidate" / "model.pt").exists()
    finally:
        lock.write_bytes(original)


def test_stage_killed_mid_run_is_redone_alone_and_leaves_no_half_written_output(project: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    from lensmith.testing.project import tool_env

    import yaml

    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["train"]["seed"] = 1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    model = project / "models" / "candidate" / "model.pt"
    before = model.stat().st_mtime_ns
    proc = subprocess.Popen(lensmith_cmd("run"), cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        # train has started once DVC removed the old outputs it is about to rebuild
        while model.exists() and model.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if model.exists():  # a model file, if any, is whole: atomic writes never leave half a file
        import torch

        assert "state_dict" in torch.load(model, map_location="cpu", weights_only=False)
    assert not list(model.parent.glob(".model.pt.*")), "temporary files must not be left as outputs"
    rerun = run(lensmith_cmd("run"), project)
    stage_lines = {line.split()[0]: line for line in rerun.stdout.splitlines() if line.startswith("  ") and "(" in line}
    for upstream in ("ingest", "validate", "split"):
        assert "unchanged" in stage_lines[upstream], rerun.stdout
    assert "ran" in stage_lines["train"], rerun.stdout
    status = run([sys.executable, "-m", "dvc", "status", "--json"], project)
    assert status.stdout.strip() == "{}", status.stdout
