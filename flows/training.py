"""The training flow: the stages of dvc.yaml as Prefect tasks, in the same graph.

The graph is DVC's own graph of the project's dvc.yaml (tasks/pipeline.py), so the flow runs what `dvc repro`
would, a project's own stages included. Each task reproduces its DVC stage: DVC decides whether it is stale and records dvc.lock, the stage function runs
in this process (tasks/dvc_inprocess.py; `orchestration.executor: dvc-subprocess` runs `dvc repro --single-item
STAGE` instead; with `orchestration.artifact_store` the stages run on workers that share no disk with the project,
through the store: tasks/store_stages.py). So after a flow run `dvc status` is clean and `dvc repro` has nothing to do, and a flow run after
`dvc repro` skips every stage.
"""

from __future__ import annotations

from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.task_runners import TaskRunner

from lensmith.layout import Layout
from lensmith.params import Params, load_params
from lensmith.paramsfile import params_overridden
from lensmith.reviewed import ensure_reviewed_folder
from tasks.pipeline import flow_graph
from tasks.runners import check_task_runner_reachable, task_runner_for
from tasks.stages import stage_task
from tasks.store_stages import reproduce_all_via_store


def stage_order(graph: dict[str, tuple[str, ...]]) -> list[str]:
    return list(TopologicalSorter(graph).static_order())


def outcomes_of_stage_tasks(graph: dict[str, tuple[str, ...]], params: Params, root: Path, runner: TaskRunner) -> dict[str, Any]:
    """Every stage as a task of `runner`, each after its upstream stages (parallel branches run side by side)."""
    futures: dict[str, Any] = {}
    for stage in stage_order(graph):
        upstream = [futures[u] for u in graph[stage]]
        parameters = {"stage": stage, "params": params, "root": root}
        futures[stage] = runner.submit(stage_task(stage, params), parameters, wait_for=upstream)
    return {stage: future.result() for stage, future in futures.items()}


@task(name="register-and-promote", cache_policy=NO_CACHE)
def promote_task(root: Path) -> dict[str, Any]:
    """Register the gated candidate as a registry version; make it production when the gate passed."""
    from lensmith.promotion import promote_if_passed

    decision = promote_if_passed(Layout(root))
    lines = [f"## {decision.note}"] + [f"- {r}" for r in decision.reasons if not decision.passed]
    create_markdown_artifact(key="promotion", markdown="\n".join(lines), description="Registry: promoted or kept")
    return decision.as_dict()


@flow(name="lensmith-training", log_prints=True)
def training_flow(
    root: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None, promote: bool = True
) -> dict[str, Any]:
    """demo data -> ingest -> validate -> split -> train -> evaluate + export (-> drift reference) -> gate
    -> register the candidate and promote it when the gate passed (promote=False: stop at the gate)."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params_path = root_path / params_file if not Path(params_file).is_absolute() else Path(params_file)
    params = load_params(params_path, overrides or [])
    ensure_reviewed_folder(root_path / params.data.reviewed_dir)  # ingest's dep, even before the first correction
    graph = flow_graph(root_path)
    check_task_runner_reachable(params.orchestration)
    with params_overridden(params_path, overrides or []), task_runner_for(params) as runner:
        if params.orchestration.artifact_store:  # workers without the project's disk: through the store
            outcomes = reproduce_all_via_store(stage_order(graph), params, root_path, runner)
        else:
            outcomes = outcomes_of_stage_tasks(graph, params, root_path, runner)
    # a project whose dvc.yaml has no gate stage has no decision to register
    promotion = promote_task(root_path) if promote and "gate" in graph else None
    if promotion is not None:
        logger.info("registry: %s", promotion["note"])
    ran = [s for s, o in outcomes.items() if o.ran]
    logger.info("stages run: %s; unchanged: %s", ran or "none", [s for s in outcomes if s not in ran] or "none")
    layout = Layout(root_path)
    return {
        "stages": {s: {"ran": o.ran, "seconds": round(o.seconds, 2)} for s, o in outcomes.items()},
        "promotion": promotion,
        "reports": {
            "validation": str(layout.validation_html),
            "evaluation": str(layout.reports / "evaluation.html"),
            "metrics": str(layout.metrics_json),
            "gate": str(layout.gate_json),
        },
    }
