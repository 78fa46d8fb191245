"""One Prefect task per pipeline stage: reproduce the stage, then publish its artifacts."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.stages import STAGE_TABLE, run_stage
from tasks.artifacts import publish_stage_artifacts
from tasks.dvc_inprocess import reproduce_in_process
from tasks.dvc_runner import StageOutcome, repro_stage


def _outcome(stage: str, params: Params, layout: Layout) -> StageOutcome:
    """Run the stage: in this process when the stage table knows it and DVC (or nothing) decides; as dvc.yaml's
    command through `dvc repro` for a project's own stage, a relaunching stage, or executor dvc-subprocess."""
    entry = STAGE_TABLE.get(stage)
    in_process = entry is not None and not entry.relaunches(params)
    executor = params.orchestration.executor
    if executor == "direct" and in_process:
        start = time.perf_counter()
        summary = run_stage(stage, params, layout)
        return StageOutcome(stage, True, time.perf_counter() - start, str(summary))
    if executor == "dvc" and in_process:
        outcome = reproduce_in_process(layout.root, stage, lambda: run_stage(stage, params, layout))
        if outcome is not None:
            return outcome
    return repro_stage(layout.root, stage, timeout_s=params.orchestration.stage_timeout_s)


def _run(stage: str, params: Params, root: Path) -> StageOutcome:
    logger = get_run_logger()
    layout = Layout(root)
    outcome = _outcome(stage, params, layout)
    logger.info("%s: %s in %.1fs", stage, "ran" if outcome.ran else "unchanged, skipped", outcome.seconds)
    if outcome.log_tail:
        logger.info(outcome.log_tail)
    publish_stage_artifacts(stage, layout)
    return outcome


def stage_task(stage: str, params: Params):  # noqa: ANN201 - a Prefect Task
    """The Prefect task for `stage`, with retries for I/O stages and the stage timeout from params."""
    orch = params.orchestration
    entry = STAGE_TABLE.get(stage)
    retries = orch.io_retries if entry is not None and entry.io_bound else 0
    return task(
        _run,
        name=stage,
        task_run_name=stage,
        retries=retries,
        retry_delay_seconds=[orch.retry_delay_s * (2**i) for i in range(retries)] if retries else 0,
        # stage_timeout_s kills `dvc repro` subprocesses (executor dvc-subprocess); Prefect cannot interrupt a
        # stage running in a worker thread, so in-process stages are bounded by their own params (epochs, patience)
        log_prints=True,
        cache_policy=NO_CACHE,  # DVC decides what is up to date
    )
