"""The deployments `lensmith schedule` serves: nightly retraining and drift monitoring, schedules from params."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.schedules import Cron

from flows.monitoring import monitoring_flow
from flows.nightly import nightly_flow
from lensmith.params import Params
from lensmith.projectpin import ROOT_ENV


def deployments(params: Params, root: Path, params_file: str = "params.yaml") -> list[Any]:
    """Nightly retraining (cron nightly.cron) and drift monitoring (cron drift.cron), as runner deployments."""
    parameters = {"root": str(root.resolve()), "params_file": params_file}
    return [
        nightly_flow.to_deployment(
            name=params.nightly.deployment_name,
            schedules=[Cron(params.nightly.cron, timezone=params.nightly.timezone)],
            parameters=parameters,
            description="Nightly retraining: pull, ingest new images, train, gate against production, promote, push, record.",
            tags=["lensmith", "nightly"],
            concurrency_limit=1,  # a drift-triggered run waits for a scheduled one instead of overlapping it
        ),
        monitoring_flow.to_deployment(
            name=params.drift.deployment_name,
            schedules=[Cron(params.drift.cron, timezone=params.drift.timezone)],
            parameters=parameters,
            description="Drift monitoring: Evidently on image stats, embeddings and predictions; starts nightly retraining on trigger.",
            tags=["lensmith", "monitoring"],
            concurrency_limit=1,
        ),
    ]


def serve_deployments(params: Params, root: Path, params_file: str = "params.yaml") -> None:
    """Register both deployments on the configured Prefect API and run their scheduled runs (until interrupted).

    The runs execute in this process, pinned to `root` (LENSMITH_ROOT): a run started through the API with another
    `root` parameter is refused before it does anything (lensmith/projectpin.py)."""
    os.environ[ROOT_ENV] = str(root.resolve())
    serve(*deployments(params, root, params_file), pause_on_shutdown=False)
