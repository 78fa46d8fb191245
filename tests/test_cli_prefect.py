"""The CLI's handling of the temporary Prefect server (no PREFECT_API_URL) vs a configured one."""

from __future__ import annotations

import os

import pytest

from lensmith import cli


@pytest.fixture(autouse=True)
def private_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The function writes os.environ: give each test a copy so nothing leaks into later tests' servers."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


def test_temporary_server_runs_without_idle_services_but_keeps_the_run_recorders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for service in cli.TEMPORARY_SERVER_IDLE_SERVICES + ("TASK_RUN_RECORDER", "EVENT_PERSISTER"):
        monkeypatch.delenv(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "true")  # the user's own choice wins
    cli._lighten_temporary_prefect_server()
    assert os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] == "false"
    assert os.environ["PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED"] == "false"
    assert os.environ["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "true"
    assert "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED" not in os.environ
    assert "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED" not in os.environ


def test_a_configured_prefect_server_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    for service in cli.TEMPORARY_SERVER_IDLE_SERVICES:
        monkeypatch.delenv(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", raising=False)
    cli._lighten_temporary_prefect_server()
    assert not any(f"PREFECT_SERVER_SERVICES_{s}_ENABLED" in os.environ for s in cli.TEMPORARY_SERVER_IDLE_SERVICES)
