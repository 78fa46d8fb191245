"""Drift monitoring: a scheduled check that, on trigger, starts the nightly retraining deployment.

monitoring_flow: run `lensmith drift` on drift.current (default: the prediction log over drift.since), cut by
`where` (default drift.where, e.g. ["site=C"]: one site's images only), publish the decision as a markdown artifact, and when it says retrain: start the nightly deployment
with run_deployment (timeout=0: fire and forget), log an alert, and post it to the webhook whose URL is in
the environment variable named by drift.webhook_url_env (default LENSMITH_DRIFT_WEBHOOK_URL) when it is set
(the URL is a secret: never in params.yaml, logged as scheme://host only; a failing webhook is logged, never fatal).
flows/deployments.py serves it as its own deployment on the drift.cron schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from lensmith.drift.current import LOG_SOURCE
from lensmith.drift.webhook import post_webhook, redact_url, webhook_url
from lensmith.layout import Layout
from lensmith.params import Params, load_params
from lensmith.projectpin import pinned_project

NIGHTLY_FLOW_NAME = "lensmith-nightly"


@task(name="drift-check", cache_policy=NO_CACHE)
def drift_task(root: str, params_file: str, source: str, since: str | None, where: list[str] | None = None) -> dict[str, Any]:
    from lensmith.drift.report import run_drift

    root_path = Path(root)
    params = load_params(root_path / params_file)
    result = run_drift(params, Layout(root_path), source, since=since, where=where)
    return result.report


def alert_markdown(report: dict[str, Any], flow_run: str | None) -> str:
    decision = report["decision"]
    conf = report["confidence"]
    now = "n/a" if conf["now"] is None else f"{conf['now']:.3f}"
    head = "## Drift: retraining triggered" if decision["retrain"] else "## Drift: no action"
    lines = [
        head,
        "",
        f"- decision: {decision['reason']}",
        f"- window: {report['current']['n_images']} images from {report['current']['source']}",
        f"- drifted columns: {report['drifted_columns']}/{report['n_columns']} (share {report['drifted_share']:.2f})",
        f"- mean confidence: {now} (reference {conf['reference']:.3f})",
        f"- quarantined files: {report['current']['n_quarantined']}",
    ]
    if flow_run:
        lines.append(f"- nightly retraining run started: `{flow_run}`")
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


@task(name="start-retraining", cache_policy=NO_CACHE)
def start_retraining_task(deployment_name: str, root: str, params_file: str) -> str:
    """Start the nightly deployment without waiting for it (timeout=0); returns the flow run's name."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        name=f"{NIGHTLY_FLOW_NAME}/{deployment_name}",
        parameters={"root": root, "params_file": params_file},
        timeout=0,
        tags=["lensmith", "drift-triggered"],
    )
    return str(run.name)


@flow(name="lensmith-monitoring", log_prints=True)
def monitoring_flow(
    root: str = ".", params_file: str = "params.yaml", current: str | None = None, since: str | None = None, where: list[str] | None = None
) -> dict[str, Any]:
    logger = get_run_logger()
    root_path, params_path = pinned_project(root, params_file)  # a run's parameters cannot pick another project
    root = str(root_path)
    params: Params = load_params(params_path)
    source = current or params.drift.current or LOG_SOURCE
    report = drift_task(root, params_file, source, since, where)
    decision = report["decision"]
    flow_run = None
    if decision["retrain"]:
        flow_run = start_retraining_task(params.nightly.deployment_name, root, params_file)
        logger.warning("drift alert: %s; started nightly retraining run %s", decision["reason"], flow_run)
    else:
        logger.info("drift check: %s", decision["reason"])
    markdown = alert_markdown(report, flow_run)
    create_markdown_artifact(key="drift", markdown=markdown, description="Drift check and retraining decision")
    webhook_error = None
    url = webhook_url(params.drift)
    if decision["retrain"] and url:
        payload = {"event": "lensmith.drift.retrain", "reason": decision["reason"], "flow_run": flow_run, "report": report}
        webhook_error = post_webhook(url, payload, params.drift.webhook_timeout_s)
        if webhook_error:
            logger.error("drift alert webhook to %s failed (the alert is still recorded here): %s", redact_url(url), webhook_error)
    return {"decision": decision, "retraining_run": flow_run, "webhook_error": webhook_error, "drifted_share": report["drifted_share"]}
