"""The temporary Prefect server `lensmith run` / `nightly` start when no Prefect API is configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lensmith import prefectserver
from lensmith.procutil import http_ok

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def private_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The functions write os.environ: give each test a copy so nothing leaks into later tests' servers."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


def test_the_server_runs_without_idle_services_but_keeps_the_run_recorders() -> None:
    env = prefectserver.server_environment({"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true", "PREFECT_API_URL": "x"})
    assert env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] == "false"
    assert env["PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED"] == "false"
    assert env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "true"  # the user's own choice wins
    assert "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED" not in env
    assert "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED" not in env
    assert env["PREFECT_UI_ENABLED"] == "0" and "PREFECT_API_URL" not in env


def test_a_server_configured_in_the_environment_or_the_active_profile_is_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    assert not prefectserver.api_configured({"PREFECT_HOME": str(home)})
    assert prefectserver.api_configured({"PREFECT_HOME": str(home), "PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    (home / "profiles.toml").write_text(
        'active = "team"\n[profiles.ephemeral]\n[profiles.team]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n'
    )
    assert prefectserver.api_configured({"PREFECT_HOME": str(home)})
    assert not prefectserver.api_configured({"PREFECT_HOME": str(home), "PREFECT_PROFILE": "ephemeral"})
    (home / "profiles.toml").write_text("not [ toml")  # a broken profile file is Prefect's to report
    assert not prefectserver.api_configured({"PREFECT_HOME": str(home)})
    os.environ["PREFECT_API_URL"] = "http://127.0.0.1:4200/api"
    assert prefectserver.start_if_needed() is None
    os.environ.pop("PREFECT_API_URL")
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    os.environ["PREFECT_HOME"] = str(home / "none")
    assert prefectserver.start_if_needed() is None


def test_a_temporary_server_answers_and_stops(tmp_path: Path) -> None:
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    server = prefectserver.start_if_needed()
    assert server is not None and os.environ["PREFECT_API_URL"] == server.api_url
    process = server.process
    try:
        server.wait_ready()
        assert http_ok(f"{server.api_url}/health")
    finally:
        server.stop()
    assert process is not None and process.poll() is not None
    assert not http_ok(f"{server.api_url}/health")


def test_a_server_that_fails_to_start_is_reported_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefectserver, "server_command", lambda port: [sys.executable, "-c", "print('no database here'); raise SystemExit(1)"])
    server = prefectserver.TemporaryPrefectServer().start()
    with pytest.raises(prefectserver.PrefectServerError, match="exited \\(status 1\\)") as info:
        server.wait_ready(timeout_s=30)
    assert "no database here" in str(info.value)
    server.stop()


def test_the_server_does_not_outlive_a_killed_cli(tmp_path: Path) -> None:
    code = (
        "import os, sys, time; from lensmith import prefectserver; os.environ.pop('PREFECT_API_URL', None);"
        "s = prefectserver.start_if_needed(); print(s.process.pid, flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    cli = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    server_pid = int(cli.stdout.readline())
    cli.send_signal(signal.SIGKILL)  # no atexit, no finally
    cli.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{server_pid}").exists():
        if Path(f"/proc/{server_pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break  # exited, waiting for its (adopting) parent to reap it
        time.sleep(0.2)
    alive = Path(f"/proc/{server_pid}").exists() and Path(f"/proc/{server_pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    if alive:
        os.kill(server_pid, signal.SIGKILL)
    assert not alive, "the temporary Prefect server outlived the CLI that started it"
