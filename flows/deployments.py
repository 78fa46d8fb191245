"""Serve the nightly retraining deployment locally (`lensmith schedule`), schedule taken from params."""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from flows.nightly import nightly_flow
from lensmith.params import Params


def nightly_schedule(params: Params) -> Cron:
    return Cron(params.nightly.cron, timezone=params.nightly.timezone)


def serve_nightly(params: Params, root: Path, params_file: str = "params.yaml") -> None:
    """Register the deployment (with its cron schedule) on the configured Prefect API and run its runs."""
    nightly_flow.serve(
        name=params.nightly.deployment_name,
        schedules=[nightly_schedule(params)],
        parameters={"root": str(root.resolve()), "params_file": params_file},
        description="Nightly retraining: pull, ingest new images, train, gate against production, promote, push, record.",
        tags=["lensmith", "nightly"],
        pause_on_shutdown=False,
    )
