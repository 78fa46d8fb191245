"""Nightly retraining: pull -> (new data?) -> training flow (incl. gate) -> promote or keep -> push -> record.

The run is recorded as a git commit + tag holding dvc.lock, params.yaml, metrics and the registry
pointers, so `git checkout <tag> && dvc pull` restores its exact data and model.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.training import training_flow
from lensmith.params import load_params
from lensmith.projectpin import pinned_project
from tasks.pipeline import git_versioned_outputs
from tasks.runners import check_task_runner_reachable
from tasks.vcs import RemoteResult, dvc_status_clean, dvc_transfer, git_commit_run

# Besides the git-tracked outputs of dvc.yaml's stages (metrics, plots: `cache: false`)
RUN_RECORD = ["dvc.lock", "params.yaml", "models/registry/aliases.json", "models/registry/versions.dvc", "models/registry/.gitignore"]


def recorded_paths(root: Path) -> list[str]:
    """What a nightly run commits: dvc.lock, params, what git versions of the stages' outputs, the registry
    pointers."""
    return list(dict.fromkeys(RUN_RECORD[:2] + git_versioned_outputs(root) + RUN_RECORD[2:]))


@task(name="dvc-pull", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20])
def pull_task(root: Path) -> RemoteResult:
    return dvc_transfer(root, "pull")


@task(name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20])
def push_task(root: Path) -> RemoteResult:
    return dvc_transfer(root, "push")


@task(name="nothing-changed", cache_policy=NO_CACHE)
def nothing_changed_task(root: Path) -> bool:
    return dvc_status_clean(root)


@task(name="track-registry", cache_policy=NO_CACHE)
def track_registry_task(root: Path) -> None:
    """Version the registry's immutable model versions with DVC (pointer file goes into git)."""
    from tasks.dvc_runner import dvc_command

    if (root / "models" / "registry" / "versions").exists():
        proc = dvc_command(root, "add", "models/registry/versions")
        if proc.returncode != 0:
            raise RuntimeError(f"dvc add models/registry/versions failed: {proc.stderr.strip()[-500:]}")


@task(name="record-run", cache_policy=NO_CACHE)
def record_task(root: Path, message: str, tag: str | None) -> str | None:
    return git_commit_run(root, recorded_paths(root), message, tag)


@flow(name="lensmith-nightly", log_prints=True)
def nightly_flow(root: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """Nightly retraining with a champion/challenger gate; a no-op when nothing changed."""
    logger = get_run_logger()
    start = time.perf_counter()
    root_path, params_path = pinned_project(root, params_file)  # a run's parameters cannot pick another project
    params = load_params(params_path)
    nightly = params.nightly
    check_task_runner_reachable(params.orchestration)  # before the pull, not at the first stage
    pulled = pull_task(root_path)
    logger.info("pull: %s", pulled.detail)
    if nothing_changed_task(root_path):
        logger.info("nothing changed since the last run: production kept, nothing to record")
        return {"status": "no-op", "seconds": round(time.perf_counter() - start, 2)}
    training = training_flow(root=str(root_path), params_file=params_file, promote=True)
    decision = training["promotion"]
    track_registry_task(root_path)
    pushed = push_task(root_path) if nightly.push else RemoteResult(False, "push disabled (nightly.push=false)")
    logger.info("push: %s", pushed.detail)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    verdict = decision["note"] if decision["passed"] else "rejected: " + "; ".join(decision["reasons"])[:200]
    commit = None
    if nightly.git_commit:
        commit = record_task(root_path, f"nightly {stamp}: {verdict}", f"{nightly.tag_prefix}{stamp}")
    return {
        "status": "promoted" if decision["promoted"] else ("unchanged" if decision["passed"] else "rejected"),
        "decision": decision,
        "training": training,
        "commit": commit,
        "seconds": round(time.perf_counter() - start, 2),
    }
