"""A temporary Prefect API server for `lensmith run` / `nightly` when none is configured.

Prefect starts the same server itself on a flow's first API call (`SubprocessASGIServer`), but only
after the flow is imported, and it first imports the whole server application into the calling process
(~2.5 s here) just to launch it. Started here, before `flows.*` (and Prefect) are imported, the server
process boots on one core while the CLI imports on the other; the CLI then points PREFECT_API_URL at it.
The command and environment are Prefect's own (uvicorn + `prefect.server.api.server:create_app`, UI off,
the ephemeral flags), so the runs land in the same database a later `prefect server start` shows.

Nothing here imports Prefect: that is the point.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lensmith.errors import LensmithError
from lensmith.procutil import free_port, http_ok

PORT_IN_USE_EXIT = 3  # uvicorn's exit status when it cannot bind
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# Server services a temporary server has no use for: they schedule deployments, watch for late, paused or
# crashed runs and evaluate automations. The task-run recorder and event persister stay on, so the runs are
# complete in the database.
IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "TRIGGERS", "REPOSSESSOR")


class PrefectServerError(LensmithError):
    """The temporary Prefect server did not come up."""


def profile_api_url(env: dict[str, str] | None = None) -> str | None:
    """PREFECT_API_URL of the active Prefect profile (profiles.toml), read without importing Prefect."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(env.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    name = env.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = (profiles.get("profiles") or {}).get(name) or {}
    url = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(url) if url else None


def api_configured(env: dict[str, str] | None = None) -> bool:
    """True when runs should go to a configured server (environment or profile), not a temporary one."""
    env = dict(os.environ if env is None else env)
    return bool(env.get("PREFECT_API_URL") or profile_api_url(env))


def ephemeral_allowed(env: dict[str, str] | None = None) -> bool:
    env = dict(os.environ if env is None else env)
    return env.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").strip().lower() not in ("0", "false", "no", "off")


def server_command(port: int) -> list[str]:
    """Prefect's own temporary-server command line (SubprocessASGIServer._run_uvicorn_command)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise PrefectServerError("Prefect is not installed in this environment")
    app_dir = Path(spec.origin).parent.parent
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]


def server_environment(base: dict[str, str]) -> dict[str, str]:
    env = {**base, **SERVER_ENV}
    for service in IDLE_SERVICES:
        env.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    return env


@dataclass
class TemporaryPrefectServer:
    """One server process; `start` launches it, `wait_ready` blocks until /api/health answers, `stop` ends it."""

    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryPrefectServer:
        self.port = free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="lensmith-prefect-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                server_command(self.port), env=server_environment(dict(os.environ)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )
        # Stopped at interpreter exit, not when the flow returns: Prefect's own exit handlers still send the
        # last logs and events to it, and atexit runs the handlers registered before Prefect's (this one) last.
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Block until the server answers /api/health; a clear error (with the server's log) if it exits or
        stays silent."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                why = f"port {self.port} was taken meanwhile; run again" if code == PORT_IN_USE_EXIT else f"status {code}"
                raise PrefectServerError(f"the temporary Prefect server exited ({why}):\n{self.log_tail()}")
            if http_ok(f"{self.api_url}/health", timeout_s=2):
                return
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise PrefectServerError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s:\n{tail}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None


def _die_with_parent() -> None:
    """In the server process before exec (Linux): SIGTERM when the CLI dies, even by SIGKILL, so no server
    is left behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_if_needed() -> TemporaryPrefectServer | None:
    """Start a temporary server and point this process's PREFECT_API_URL at it, unless a server is
    configured (environment or profile) or ephemeral mode is off; returns it, or None. It stops at exit."""
    if api_configured() or not ephemeral_allowed():
        return None
    server = TemporaryPrefectServer().start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
