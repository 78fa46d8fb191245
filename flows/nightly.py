"""Nightly retraining: pull -> (new data?) -> training flow (incl. gate) -> promote or keep -> push -> record.

The run is recorded as a git commit + tag holding dvc.lock, params.yaml, metrics and the registry
pointers, so `git checkout <tag> && dvc pull` restores its exact data and model.

The S3 remote down loses nothing: a pull that fails falls back to the local DVC cache (`dvc checkout`,
what a pull does after fetching) and the run goes on when that restores every output; a push that fails
after its retries leaves the run recorded locally (commit + tag, the DVC cache holds its data and model),
writes `.lensmith/push-pending.json`, and fails the flow run with that message; the next run pushes
first, before anything else, even when it has nothing to retrain.
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
from lensmith.reviewed import git_tracked_paths
from tasks.pipeline import git_versioned_outputs
from tasks.runners import check_task_runner_reachable
from tasks.vcs import (
    RemoteError,
    RemoteResult,
    checkout_local,
    clear_push_pending,
    dvc_status_clean,
    dvc_transfer,
    git_commit_run,
    mark_push_pending,
    read_push_pending,
)

# Besides the git-tracked outputs of dvc.yaml's stages (metrics, plots: `cache: false`)
RUN_RECORD = ["dvc.lock", "params.yaml", "models/registry/aliases.json", "models/registry/versions.dvc", "models/registry/.gitignore"]


def recorded_paths(root: Path, reviewed_dir: str = "data/reviewed") -> list[str]:
    """What a nightly run commits: dvc.lock, params, what git versions of the stages' outputs, the registry
    pointers, and the reviewed-data folder's metadata.csv and DVC pointers (human corrections are data)."""
    reviewed = git_tracked_paths(root, root / reviewed_dir)
    return list(dict.fromkeys(RUN_RECORD[:2] + git_versioned_outputs(root) + RUN_RECORD[2:] + reviewed))


@task(name="dvc-pull", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20])
def pull_task(root: Path) -> RemoteResult:
    return dvc_transfer(root, "pull")


@task(name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20])
def push_task(root: Path) -> RemoteResult:
    return dvc_transfer(root, "push")


@task(name="dvc-checkout-local", cache_policy=NO_CACHE)
def checkout_local_task(root: Path) -> RemoteResult:
    return checkout_local(root)


def pull_or_local(root: Path, logger: Any) -> RemoteResult:
    """Pull; when the remote cannot be reached, the local cache's outputs (or a RemoteError naming both failures)."""
    state = pull_task(root, return_state=True)
    if not state.is_failed():
        return state.result()
    failure = failure_text(state)
    logger.warning("dvc pull failed (%s); going on with the local DVC cache", failure)
    try:
        return checkout_local_task(root)
    except RemoteError as exc:
        raise RemoteError(f"dvc pull failed ({failure}) and {exc}") from None


def push_or_pending(root: Path, logger: Any) -> RemoteResult:
    """Push; a failure (after the task's retries) is remembered in .lensmith/push-pending.json, not raised."""
    state = push_task(root, return_state=True)
    if not state.is_failed():
        clear_push_pending(root)
        return state.result()
    failure = failure_text(state)
    mark_push_pending(root, failure)
    logger.error("dvc push failed (%s): kept locally, the next run pushes it first", failure)
    return RemoteResult(False, f"push failed: {failure}", failed=True)


def failure_text(state: Any) -> str:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the task's own exception, reported as text
        return str(exc)
    return str(state.message)


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
def record_task(root: Path, message: str, tag: str | None, reviewed_dir: str = "data/reviewed") -> str | None:
    return git_commit_run(root, recorded_paths(root, reviewed_dir), message, tag)


@flow(name="lensmith-nightly", log_prints=True)
def nightly_flow(root: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """Nightly retraining with a champion/challenger gate; a no-op when nothing changed."""
    logger = get_run_logger()
    start = time.perf_counter()
    root_path, params_path = pinned_project(root, params_file)  # a run's parameters cannot pick another project
    params = load_params(params_path)
    nightly = params.nightly
    check_task_runner_reachable(params.orchestration)  # before the pull, not at the first stage
    pulled = pull_or_local(root_path, logger)
    logger.info("pull: %s", pulled.detail)
    pending = read_push_pending(root_path)
    earlier = RemoteResult(False, "nothing pending")
    if pending is not None and nightly.push:
        logger.info("an earlier run's push is pending since %s: pushing it first", pending.get("since"))
        earlier = push_or_pending(root_path, logger)
    if nothing_changed_task(root_path):
        if earlier.failed:
            raise RemoteError(f"nothing to retrain, but the push pending since {pending.get('since') if pending else '?'} failed "
                              f"again ({earlier.detail}); nothing is lost: the runs are recorded in git and their data and "
                              "models are in the local DVC cache")
        logger.info("nothing changed since the last run: production kept, nothing to record")
        return {"status": "no-op", "pushed_pending": earlier.ran, "seconds": round(time.perf_counter() - start, 2)}
    training = training_flow(root=str(root_path), params_file=params_file, promote=True)
    decision = training["promotion"]
    track_registry_task(root_path)
    pushed = push_or_pending(root_path, logger) if nightly.push else RemoteResult(False, "push disabled (nightly.push=false)")
    logger.info("push: %s", pushed.detail)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    verdict = decision["note"] if decision["passed"] else "rejected: " + "; ".join(decision["reasons"])[:200]
    commit = None
    if nightly.git_commit:
        commit = record_task(root_path, f"nightly {stamp}: {verdict}", f"{nightly.tag_prefix}{stamp}", params.data.reviewed_dir)
    if pushed.failed:
        raise RemoteError(
            f"the run finished ({verdict}) and is recorded locally (commit {commit or 'none: nightly.git_commit=false'}), "
            f"but {pushed.detail}; nothing is lost: the next nightly run pushes it first"
        )
    return {
        "status": "promoted" if decision["promoted"] else ("unchanged" if decision["passed"] else "rejected"),
        "decision": decision,
        "training": training,
        "commit": commit,
        "seconds": round(time.perf_counter() - start, 2),
    }
