"""tasks/dvc_inprocess.py on a real git + DVC repository: DVC decides and records, the stage runs in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from lensmith.testing.project import run
from tasks.dvc_inprocess import reproduce_in_process, runs_lensmith_stage
from tasks.dvc_runner import StageFailedError


def test_only_the_stock_lensmith_command_runs_in_process() -> None:
    assert runs_lensmith_stage("lensmith split", "split")
    assert runs_lensmith_stage("lensmith gate --report-only", "gate")
    assert runs_lensmith_stage("lensmith drift-reference", "drift_reference")
    assert not runs_lensmith_stage("python my_split.py", "split")
    assert not runs_lensmith_stage("lensmith train", "split")
    assert not runs_lensmith_stage("lensmith split --params other.yaml", "split")
    assert not runs_lensmith_stage("lensmith gate", "gate")
    assert not runs_lensmith_stage(["lensmith split", "echo done"], "split")
    assert not runs_lensmith_stage(None, "split")


def write_pipeline(root: Path, cmd: str = "lensmith split") -> None:
    stage = {"cmd": cmd, "deps": ["input.txt"], "params": ["split.seed"], "outs": ["out/result.json"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"split": stage}}))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], tmp_path)
    (tmp_path / "input.txt").write_text("images\n")
    (tmp_path / "params.yaml").write_text("split:\n  seed: 1\n")
    write_pipeline(tmp_path)
    return tmp_path


def stage_function(root: Path, calls: list[int]):  # noqa: ANN201
    def run_split() -> str:
        seed = yaml.safe_load((root / "params.yaml").read_text())["split"]["seed"]
        calls.append(seed)
        (root / "out").mkdir(exist_ok=True)
        (root / "out" / "result.json").write_text(json.dumps({"seed": seed, "input": (root / "input.txt").read_text()}))
        return f"split with seed {seed}"

    return run_split


def dvc_status(root: Path) -> dict:
    return json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout)


def test_stale_stage_runs_in_process_and_is_recorded_like_dvc_repro(repo: Path) -> None:
    calls: list[int] = []
    outcome = reproduce_in_process(repo, "split", stage_function(repo, calls))
    assert outcome is not None and outcome.ran and outcome.log_tail.startswith("split with seed 1\nDVC check ")
    assert calls == [1]
    assert dvc_status(repo) == {}
    assert "up to date" in run([sys.executable, "-m", "dvc", "repro"], repo).stdout.lower()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["split"]
    assert lock["params"]["params.yaml"]["split.seed"] == 1 and lock["outs"][0]["path"] == "out/result.json"

    again = reproduce_in_process(repo, "split", stage_function(repo, calls))
    assert again is not None and not again.ran and calls == [1]


def test_changed_params_rerun_and_reverting_restores_from_the_run_cache(repo: Path) -> None:
    calls: list[int] = []
    reproduce_in_process(repo, "split", stage_function(repo, calls))
    (repo / "params.yaml").write_text("split:\n  seed: 2\n")
    assert reproduce_in_process(repo, "split", stage_function(repo, calls)).ran
    assert json.loads((repo / "out" / "result.json").read_text())["seed"] == 2
    (repo / "params.yaml").write_text("split:\n  seed: 1\n")
    restored = reproduce_in_process(repo, "split", stage_function(repo, calls))
    assert restored.ran and restored.log_tail.startswith("restored from the DVC run cache")
    assert calls == [1, 2], "the run cache must have supplied seed 1's output without running the stage"
    assert json.loads((repo / "out" / "result.json").read_text())["seed"] == 1
    assert dvc_status(repo) == {}


def test_a_failing_stage_leaves_the_lock_untouched_so_the_next_run_redoes_it(repo: Path) -> None:
    def broken() -> str:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        reproduce_in_process(repo, "split", broken)
    assert not (repo / "dvc.lock").exists()
    calls: list[int] = []
    assert reproduce_in_process(repo, "split", stage_function(repo, calls)).ran and calls == [1]


def test_customised_command_is_left_to_dvc_repro(repo: Path) -> None:
    write_pipeline(repo, cmd="python make_split.py")
    calls: list[int] = []
    assert reproduce_in_process(repo, "split", stage_function(repo, calls)) is None
    assert calls == [] and not (repo / "out").exists()


def test_corrupt_dvc_lock_names_the_stage_and_the_file(repo: Path) -> None:
    reproduce_in_process(repo, "split", stage_function(repo, []))
    lock = repo / "dvc.lock"
    original = lock.read_bytes()
    lock.write_bytes(b"<<<<<<< HEAD\nschema: '2.0'\n=======\n>>>>>>> other\n" + original)
    with pytest.raises(StageFailedError, match=r"stage 'split' failed .*dvc\.lock"):
        reproduce_in_process(repo, "split", stage_function(repo, []))
    assert lock.read_bytes().endswith(original), "a failed run must not rewrite dvc.lock"
