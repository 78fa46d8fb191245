"""Against a real local Prefect server: the training flow's run, task runs and artifacts (API and UI in
headless Chromium), and the nightly deployment registered with its cron schedule and run on trigger."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from prefect_server import PrefectServer, api, prefect_server, wait_for_deployment, wait_for_flow_run  # noqa: F401  (fixture)
from lensmith.testing.flywheel import running_schedule
from lensmith.testing.project import REPO, make_project, run

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served_project(tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer) -> tuple[Path, str]:  # noqa: F811
    root = make_project(tmp_path_factory.mktemp("ui") / "proj", ["nightly.push=false"])
    proc = run([sys.executable, "-m", "lensmith.cli", "run"], root, env=prefect_server.env(), timeout=1200)
    assert "reports:" in proc.stdout
    runs = api(prefect_server, "post", "/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 5})
    training = [r for r in runs if r["name"] and r["state_type"] == "COMPLETED"]
    assert training, runs
    return root, training[0]["id"]


def test_flow_run_task_runs_and_artifacts_are_recorded(served_project, prefect_server: PrefectServer) -> None:  # noqa: ANN001, F811
    _, flow_run_id = served_project
    tasks = api(prefect_server, "post", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
    names = {t["name"] for t in tasks}
    for stage in ("ingest", "validate", "split", "train", "evaluate"):
        assert any(n.startswith(stage) for n in names), names
    assert all(t["state_type"] == "COMPLETED" for t in tasks)
    artifacts = api(prefect_server, "post", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    keys = {a["key"] for a in artifacts}
    assert {"test-metrics", "per-class-metrics", "split-counts", "data-validation"} <= keys, keys


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium missing: `make install-dev` installs it (needs root/apt)")
def test_ui_shows_the_flow_run_its_tasks_and_metrics_artifact(served_project, prefect_server: PrefectServer) -> None:  # noqa: ANN001, F811
    from playwright.sync_api import sync_playwright

    root, flow_run_id = served_project
    shot_dir = REPO / "reports"
    shot_dir.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{prefect_server.ui_url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        page.get_by_text("lensmith-training").first.wait_for(timeout=30000)
        page.get_by_text("Completed").first.wait_for(timeout=30000)
        page.screenshot(path=str(shot_dir / "prefect_flow_run.png"), full_page=True)
        page.get_by_text("Task Runs", exact=True).first.click()
        for stage in ("ingest", "train", "evaluate"):
            page.get_by_text(stage, exact=False).first.wait_for(timeout=30000)
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("test-metrics").first.wait_for(timeout=30000)
        page.screenshot(path=str(shot_dir / "prefect_artifacts.png"), full_page=True)
        browser.close()
    assert (shot_dir / "prefect_flow_run.png").stat().st_size > 10_000


def test_nightly_deployment_registers_with_cron_and_a_triggered_run_completes(served_project, prefect_server: PrefectServer) -> None:  # noqa: ANN001, F811
    root, _ = served_project
    with running_schedule(root, prefect_server.env()):
        deployment = wait_for_deployment(prefect_server, "lensmith-nightly/nightly-retraining")
        assert deployment is not None, (root / "schedule.log").read_text()[-3000:]
        schedules = [s["schedule"] for s in deployment["schedules"]]
        assert {"cron": "0 2 * * *", "timezone": "UTC"}.items() <= schedules[0].items(), schedules
        monitoring = wait_for_deployment(prefect_server, "lensmith-monitoring/drift-monitoring")
        assert monitoring is not None and monitoring["schedules"][0]["schedule"]["cron"] == "0 6 * * *"
        flow_run = api(prefect_server, "post", f"/deployments/{deployment['id']}/create_flow_run", json={})
        state = wait_for_flow_run(prefect_server, flow_run["id"], 600)
        assert state == "COMPLETED", (root / "schedule.log").read_text()[-4000:]
