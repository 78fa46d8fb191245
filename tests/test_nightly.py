"""Nightly retraining end to end on a real S3 remote: promote, record, reproduce, no-op, reject."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from lensmith.procutil import free_port
from lensmith.testing.project import LENIENT_GATE, make_project, run, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lensmith(root: Path, *args: str, env: dict[str, str]):  # noqa: ANN201
    return run([sys.executable, "-m", "lensmith.cli", *args], root, env=env, timeout=1500)


@pytest.fixture(scope="module")
def nightly_project(tmp_path_factory: pytest.TempPathFactory, s3_server) -> tuple[Path, dict[str, str]]:  # noqa: ANN001
    env = tool_env(s3_server.env)
    root = make_project(tmp_path_factory.mktemp("nightly") / "proj", LENIENT_GATE)
    bucket = s3_server.make_bucket("nightly")
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"], root, env=env)
    run([sys.executable, "-m", "dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url], root, env=env)
    run(["git", "commit", "-qam", "S3 remote"], root)
    proc = lensmith(root, "nightly", env=env)
    assert "nightly: promoted" in proc.stdout, proc.stdout + proc.stderr
    return root, env


def test_first_nightly_promotes_records_and_pushes(nightly_project) -> None:  # noqa: ANN001
    root, _ = nightly_project
    aliases = json.loads((root / "models" / "registry" / "aliases.json").read_text())
    assert aliases["production"] == "v0001"
    tags = run(["git", "tag", "--list", "nightly-*"], root).stdout.split()
    assert len(tags) == 1
    tracked = run(["git", "show", "--name-only", "--format=", tags[0]], root).stdout.split()
    assert {"dvc.lock", "reports/metrics.json", "reports/gate.json", "models/registry/aliases.json"} <= set(tracked)
    assert run(["git", "status", "--porcelain", "--", "dvc.lock", "params.yaml"], root).stdout.strip() == ""


def test_run_ref_plus_dvc_pull_restores_identical_data_and_model_and_retrains_identically(nightly_project, tmp_path: Path) -> None:  # noqa: ANN001
    root, env = nightly_project
    tag = run(["git", "tag", "--list", "nightly-*"], root).stdout.split()[0]
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "--branch", tag, str(root), str(clone)], tmp_path)
    run([sys.executable, "-m", "dvc", "pull"], clone, env=env)
    for rel in ["data/manifest.parquet", "data/splits/train.parquet", "data/splits/test.parquet",
                "models/candidate/model.pt", "models/registry/versions/v0001/model.pt"]:
        assert sha256(clone / rel) == sha256(root / rel), rel
    assert run([sys.executable, "-m", "dvc", "status", "--json"], clone, env=env).stdout.strip() == "{}"
    run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train"], clone, env=env)
    retrained = torch.load(clone / "models/candidate/model.pt", map_location="cpu", weights_only=False)["state_dict"]
    original = torch.load(root / "models/candidate/model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert retrained.keys() == original.keys()
    for key in original:
        assert torch.equal(retrained[key], original[key]), key


def test_noop_nightly_is_fast_and_changes_nothing(nightly_project) -> None:  # noqa: ANN001
    root, env = nightly_project
    head = run(["git", "rev-parse", "HEAD"], root).stdout
    start = time.perf_counter()
    proc = lensmith(root, "nightly", env=env)
    elapsed = time.perf_counter() - start
    assert "nightly: no-op" in proc.stdout, proc.stdout
    assert run(["git", "rev-parse", "HEAD"], root).stdout == head
    print(f"no-op nightly: {elapsed:.1f}s wall (target <= 20 s on a quiet machine)")


def test_rejected_candidate_keeps_production_and_is_recorded(nightly_project) -> None:  # noqa: ANN001
    root, env = nightly_project
    params = (root / "params.yaml").read_text().replace("min_accuracy: 0.0", "min_accuracy: 0.999")
    (root / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "stricter gate"], root)
    proc = lensmith(root, "nightly", env=env)
    assert "nightly: rejected" in proc.stdout, proc.stdout
    aliases = json.loads((root / "models" / "registry" / "aliases.json").read_text())
    assert aliases["production"] == "v0001"
    gate = json.loads((root / "reports" / "gate.json").read_text())
    assert gate["passed"] is False and any("accuracy" in r for r in gate["reasons"])
    assert "rejected" in run(["git", "log", "-1", "--format=%s"], root).stdout


def test_remote_down_loses_nothing_and_the_next_run_pushes_first(nightly_project) -> None:  # noqa: ANN001
    root, env = nightly_project
    dvc = [sys.executable, "-m", "dvc"]
    dead = f"http://127.0.0.1:{free_port()}"
    run([*dvc, "remote", "modify", "--local", "storage", "endpointurl", dead], root, env=env)  # the remote goes down
    params = (root / "params.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (root / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "two epochs"], root)
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()

    down = run([sys.executable, "-m", "lensmith.cli", "nightly"], root, env=env, check=False, timeout=1500)
    assert down.returncode != 0, down.stdout
    assert "nothing is lost" in down.stderr and "push" in down.stderr, down.stderr[-3000:]
    assert (root / ".lensmith" / "push-pending.json").is_file()
    assert run(["git", "rev-parse", "HEAD"], root).stdout.strip() != head, "the run is recorded although the push failed"
    assert run(["git", "status", "--porcelain", "--", "dvc.lock", "params.yaml"], root).stdout.strip() == ""

    run([*dvc, "remote", "modify", "--local", "--unset", "storage", "endpointurl"], root, env=env)  # it is back
    not_pushed = run([*dvc, "status", "--cloud", "--json"], root, env=env)
    assert not_pushed.stdout.strip() not in ("", "{}"), "the remote cannot have the new run's outputs yet"
    again = lensmith(root, "nightly", env=env)
    assert "nightly: no-op" in again.stdout, again.stdout
    assert not (root / ".lensmith" / "push-pending.json").exists()
    synced = run([*dvc, "status", "--cloud", "--json"], root, env=env)
    assert synced.stdout.strip() in ("", "{}"), f"the next run pushed what the failed push left: {synced.stdout[-2000:]}"
