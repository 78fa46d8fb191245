"""The monitoring flow (real Prefect flow run on a temporary API): on drift it starts the nightly deployment
without waiting, records an alert artifact, and survives a failing webhook; without drift it does nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageEnhance

from servekit import copy_project

from lensmith.drift.reference import build_reference
from lensmith.params import params_from_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    layout = copy_project(tmp_path_factory.mktemp("monitoring"))
    raw = {
        "train": {"model": "mobilenet_v3_small", "image_size": 32, "pretrained": False},
        "drift": {"model": "candidate", "min_window": 5, "embedding_dims": 4, "share_threshold": 0.3,
                  "webhook_url_env": "LENSMITH_TEST_DRIFT_WEBHOOK", "webhook_timeout_s": 1.0},
    }
    params_from_dict(raw)
    (layout.root / "params.yaml").write_text(json.dumps(raw))
    build_reference(params_from_dict(raw), layout, layout.candidate)
    for file in sorted((layout.root / "data/raw/demo").rglob("*.jpg")):
        out = layout.root / "dark" / file.relative_to(layout.root / "data/raw/demo")
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageEnhance.Brightness(Image.open(file)).enhance(0.4).save(out)
    return layout.root


def test_trigger_starts_nightly_without_waiting_and_records_an_alert(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.deployments

    from flows.monitoring import monitoring_flow

    calls: list[dict[str, Any]] = []

    class Run:
        name = "fake-nightly-run"

    def fake_run_deployment(name: str, **kwargs: Any) -> Run:
        calls.append({"name": name, **kwargs})
        return Run()

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    monkeypatch.setenv("LENSMITH_TEST_DRIFT_WEBHOOK", "http://127.0.0.1:9/unreachable/s3cr3t-token")
    result = monitoring_flow(root=str(project), params_file="params.yaml", current="dark")
    assert result["decision"]["retrain"] is True
    assert calls == [
        {"name": "lensmith-nightly/nightly-retraining", "parameters": {"root": str(project), "params_file": "params.yaml"},
         "timeout": 0, "tags": ["lensmith", "drift-triggered"]}
    ]
    assert result["retraining_run"] == "fake-nightly-run"
    assert result["webhook_error"], "the unreachable webhook is reported, not raised"
    assert "s3cr3t-token" not in json.dumps(result, default=str), "the webhook URL is a secret: scheme://host only"


def test_no_drift_starts_nothing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.deployments

    from flows.monitoring import monitoring_flow

    monkeypatch.setattr(prefect.deployments, "run_deployment", lambda *a, **k: pytest.fail("must not start retraining"))
    result = monitoring_flow(root=str(project), params_file="params.yaml", current="data/raw/demo")
    assert result["decision"]["retrain"] is False and result["retraining_run"] is None


def test_alert_markdown_names_reason_window_and_run() -> None:
    from flows.monitoring import alert_markdown

    report = {
        "decision": {"retrain": True, "reason": "retrain: drifted share 0.80 >= 0.50"},
        "confidence": {"now": 0.7, "reference": 0.9},
        "current": {"n_images": 120, "source": "s3://b/p", "n_quarantined": 2},
        "drifted_columns": 8, "n_columns": 10, "drifted_share": 0.8, "notes": [],
    }
    text = alert_markdown(report, "brave-otter")
    assert "retraining triggered" in text and "drifted share 0.80" in text and "brave-otter" in text and "s3://b/p" in text


def test_schedule_serves_monitoring_with_the_drift_schedule_beside_nightly(tmp_path: Path) -> None:
    from flows.deployments import deployments

    params = params_from_dict({"drift": {"cron": "*/30 * * * *", "timezone": "Europe/Berlin", "deployment_name": "watch"}})
    nightly, monitoring = deployments(params, tmp_path)
    assert (nightly.name, monitoring.name) == ("nightly-retraining", "watch")
    assert monitoring.parameters["root"] == str(tmp_path.resolve())
    schedule = monitoring.schedules[0].schedule
    assert schedule.cron == "*/30 * * * *" and schedule.timezone == "Europe/Berlin"
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
