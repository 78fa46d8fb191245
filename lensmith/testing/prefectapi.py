"""Calls to a Prefect server's REST API (test support and bench): deployments, flow runs, waiting on them."""

from __future__ import annotations

import time
from typing import Any

import httpx


def api(api_url: str, method: str, path: str, **kwargs: Any) -> Any:
    """One API call; a 503 (Prefect's answer to errors a client can retry on, e.g. its SQLite database busy
    with the served deployments' polling) is retried as Prefect's own client does."""
    for wait in (0.5, 1, 2, 4, 8, None):
        response = httpx.request(method, api_url + path, timeout=30, **kwargs)
        if response.status_code != 503 or wait is None:
            break
        time.sleep(wait)
    response.raise_for_status()
    return response.json()


def wait_for_deployment(api_url: str, name: str, timeout_s: float = 120) -> dict[str, Any] | None:
    """The deployment `flow/deployment` once it is registered, or None after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return api(api_url, "get", f"/deployments/name/{name}")
        except httpx.HTTPStatusError:
            time.sleep(1)
    return None


FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout_s: float) -> str | None:
    """The flow run's final state type (COMPLETED, FAILED, CRASHED, CANCELLED), or its state at the timeout."""
    state = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = api(api_url, "get", f"/flow_runs/{flow_run_id}")["state_type"]
        if state in FINAL_STATES:
            break
        time.sleep(2)
    return state


def flow_runs_of(api_url: str, deployment_id: str, tag: str | None = None) -> list[dict[str, Any]]:
    """Flow runs of one deployment (with `tag` when given), newest first."""
    runs: dict[str, Any] = {"deployment_id": {"any_": [deployment_id]}}
    if tag is not None:
        runs["tags"] = {"all_": [tag]}
    return api(api_url, "post", "/flow_runs/filter", json={"flow_runs": runs, "sort": "START_TIME_DESC"})
