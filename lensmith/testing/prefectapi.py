"""A real `prefect server start` on 127.0.0.1 (free port, its own PREFECT_HOME) and calls to its REST API:
deployments, flow runs, waiting on them. Test support (tests/prefect_server.py) and bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lensmith.procutil import free_port, http_ok, wait_until


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    home: Path

    def env(self) -> dict[str, str]:
        """Environment for a client process talking to this server."""
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            DVC_NO_ANALYTICS="1",
        )
        return env


@contextmanager
def running_prefect_server(home: Path) -> Iterator[PrefectServer]:
    """`prefect server start` with PREFECT_HOME=home until the block ends (SIGTERM, then SIGKILL)."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
        # a run turned back by a deployment's concurrency limit is retried after this long (default 30 s)
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="5",
        DO_NOT_TRACK="1",
    )
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        if not wait_until(lambda: http_ok(f"{api}/health") or proc.poll() is not None, timeout_s=90):
            raise RuntimeError(f"prefect server did not become healthy; log: {(home / 'server.log').read_text()[-2000:]}")
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        yield PrefectServer(api_url=api, ui_url=f"http://127.0.0.1:{port}", home=home)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


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
