"""Nightly retraining on a Prefect work pool, as on a server machine (issue #19): a real `prefect server`, a process
work pool, the deployments of prefect.yaml (`prefect deploy --all`), a `prefect worker start` subprocess that runs
them; two runs triggered at once, the second waits for the first (the deployments' concurrency_limit 1)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prefect_server import PrefectServer, prefect_server  # noqa: F401  (fixture)
from lensmith.testing.background import background
from lensmith.testing.prefectapi import FINAL_STATES, api
from lensmith.testing.project import REPO, make_project, run

pytestmark = pytest.mark.slow

POOL = "lensmith-process"  # prefect.yaml's work pool
NIGHTLY = "lensmith-nightly/nightly-retraining"


@dataclass(frozen=True)
class PoolProject:
    root: Path
    server: PrefectServer
    worker_log: Path


def pool_env(server: PrefectServer, root: Path) -> dict[str, str]:
    """The worker machine's environment: the server, the pinned project (prefect.yaml's pull step cds into it),
    a worker that polls every second instead of every 10."""
    return {**server.env(), "LENSMITH_ROOT": str(root), "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}


@pytest.fixture(scope="module")
def pool_project(tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer) -> Iterator[PoolProject]:  # noqa: F811
    """A tiny project holding the flows (a checkout, as on a worker machine), deployed to a process work pool,
    with one worker running; the worker is stopped at the end (the server by its fixture)."""
    root = make_project(tmp_path_factory.mktemp("pool") / "proj", ["nightly.push=false"])
    for package in ("flows", "tasks"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "flows"], root)
    env = pool_env(prefect_server, root)
    run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"], root, env=env)
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], root, env=env)
    log = root.parent / "worker.log"
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", "test-worker"]
    with background(worker, root, env, log):
        yield PoolProject(root, prefect_server, log)


def trigger(server: PrefectServer, name: str) -> str:
    """run_deployment without waiting: a scheduled flow run for the worker to pick up; returns its id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        return str(run_deployment(name, timeout=0).id)


def wait_final(server: PrefectServer, run_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        runs = {i: api(server.api_url, "get", f"/flow_runs/{i}") for i in run_ids}
        if all(r["state_type"] in FINAL_STATES for r in runs.values()) or time.monotonic() > deadline:
            return runs
        time.sleep(2)


def state_names(server: PrefectServer, run_id: str) -> list[str]:
    return [s["name"] for s in api(server.api_url, "get", "/flow_run_states/", params={"flow_run_id": run_id})]


def test_two_nightly_runs_on_the_work_pool_one_waits_then_both_complete(pool_project: PoolProject) -> None:
    server = pool_project.server
    ids = [trigger(server, NIGHTLY), trigger(server, NIGHTLY)]
    runs = wait_final(server, ids, timeout_s=420)
    worker_log = pool_project.worker_log.read_text(errors="replace")[-3000:]
    assert [r["state_name"] for r in runs.values()] == ["Completed", "Completed"], worker_log

    first, second = sorted(runs.values(), key=lambda r: r["start_time"])
    # both ran in processes the worker started, from the work pool (not flow calls in this process)
    assert {r["work_pool_name"] for r in (first, second)} == {POOL}
    assert all(r["infrastructure_pid"] for r in (first, second))
    # concurrency_limit 1: the second was turned back while the first ran, and started only after it ended
    assert "AwaitingConcurrencySlot" in state_names(server, second["id"]), state_names(server, second["id"])
    assert "AwaitingConcurrencySlot" not in state_names(server, first["id"])
    assert second["start_time"] >= first["end_time"]

    # the first retrained and recorded the run in the project; the second found nothing changed (a no-op)
    root = pool_project.root
    assert (root / "reports" / "metrics.json").is_file()
    assert len(run(["git", "tag", "--list", "nightly-*"], root).stdout.split()) == 1
    assert second["total_run_time"] < first["total_run_time"]
