"""The training flow's stages on workers that share no disk with the project (`orchestration.artifact_store`).

Per stage, in the flow's order, on the flow machine: DVC decides whether the stage is stale (or restores it from
the run cache), exactly as for a local run (tasks/dvc_inprocess.py); a stale stage's data deps that the store
lacks or holds in another version are uploaded; `lensmith.remote.run_stage_at` runs on a worker of the task runner
in a scratch project of its own; the outs are downloaded back into the project, each file atomically, and DVC
records the run in dvc.lock. So `dvc status` is clean afterwards, as after `dvc repro`.

A worker that dies mid-stage: Dask reruns its task on another worker; its uploads are atomic (temporary key, size
check, move) and the temporary keys it left are removed here. When no worker is left, the flow fails naming the
stage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner

from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.remote import (
    RemoteStageResult,
    StageIO,
    fetch_outputs,
    open_project,
    remove_temporary_keys,
    run_stage_at,
    send_inputs,
)
from lensmith.stages import STAGE_TABLE
from tasks.artifacts import publish_stage_artifacts
from tasks.dvc_inprocess import reproduce_in_process
from tasks.dvc_runner import StageFailedError, StageOutcome, repro_stage
from tasks.pipeline import stage_io


def worker_scratch(stage: str) -> Path:
    """A fresh scratch project for `stage`: under the Dask worker's local directory, else the temp folder."""
    try:
        from distributed import get_worker

        base = Path(get_worker().local_directory)
    except (ImportError, ValueError):  # not inside a Dask worker (thread runner)
        base = Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"lensmith-{stage}-", dir=base))


def _run_at_store(stage: str, store: str, params: Params, io: StageIO) -> RemoteStageResult:
    scratch = worker_scratch(stage)
    try:
        return run_stage_at(stage, store, params, scratch, io)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def store_stage_task(stage: str):  # noqa: ANN201 - a Prefect Task
    # no Prefect retries: a lost worker's task is rerun by Dask; a stage that raises would raise again
    return task(_run_at_store, name=f"{stage}@store", task_run_name=f"{stage}@store", cache_policy=NO_CACHE, log_prints=True)


def run_on_worker(stage: str, params: Params, root: Path, runner: TaskRunner) -> RemoteStageResult:
    """Upload what the stage reads, run it on a worker of `runner` against the store, download what it wrote."""
    logger = get_run_logger()
    store = str(params.orchestration.artifact_store)
    io = stage_io(stage, params, root / "dvc.yaml")
    fs, base = open_project(store, params)
    sent = send_inputs(fs, base, root, stage, io)
    logger.info("%s: uploaded %d input file(s) to %s", stage, len(sent), store)
    future = runner.submit(store_stage_task(stage), {"stage": stage, "store": store, "params": params, "io": io})
    try:
        result: RemoteStageResult = future.result()
    except Exception as exc:
        raise StageFailedError(f"stage {stage!r} failed on a worker ({type(exc).__name__}: {exc})") from exc
    finally:
        removed = remove_temporary_keys(fs, base, io.outs)
        if removed:
            logger.warning("%s: removed %d temporary key(s) a lost worker left: %s", stage, len(removed), removed[:5])
    fetched = fetch_outputs(fs, base, root, io.outs)
    logger.info("%s ran on a worker (%s); downloaded %d file(s)", stage, result.worker, len(fetched))
    return result


def reproduce_via_store(stage: str, params: Params, root: Path, runner: TaskRunner) -> StageOutcome:
    """One stage through the store, recorded by DVC; a stage the stage table does not know (a project's own) or one
    that relaunches itself (torchrun) runs here as `dvc repro --single-item STAGE`."""
    entry = STAGE_TABLE.get(stage)
    outcome = None
    if entry is not None and not entry.relaunches(params):
        outcome = reproduce_in_process(root, stage, lambda: run_on_worker(stage, params, root, runner))
    if outcome is None:
        outcome = repro_stage(root, stage, timeout_s=params.orchestration.stage_timeout_s)
    get_run_logger().info("%s: %s in %.1fs", stage, "ran" if outcome.ran else "unchanged, skipped", outcome.seconds)
    publish_stage_artifacts(stage, Layout(root))
    return outcome


def reproduce_all_via_store(order: list[str], params: Params, root: Path, runner: TaskRunner) -> dict[str, Any]:
    """Every stage of `order` through the store, one after another (the store holds one version of each file)."""
    start = time.perf_counter()
    outcomes = {stage: reproduce_via_store(stage, params, root, runner) for stage in order}
    get_run_logger().info("pipeline through %s in %.1fs", params.orchestration.artifact_store, time.perf_counter() - start)
    return outcomes
