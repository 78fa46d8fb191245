"""Run DVC commands for the flows (subprocess: the same `dvc` a developer types)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lensmith.errors import LensmithError


class StageFailedError(LensmithError):
    """A pipeline stage exited non-zero; the message carries its own error output."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # False when DVC found nothing changed and skipped it
    seconds: float
    log_tail: str


def tool_env() -> dict[str, str]:
    """Environment for child processes: this interpreter's bin/ first on PATH, telemetry off."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


def dvc_command(root: Path, *args: str, timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def repro_stage(root: Path, stage: str, *, timeout_s: float | None = None) -> StageOutcome:
    """`dvc repro --single-item STAGE`: runs the stage only if its deps/params changed."""
    start = time.perf_counter()
    proc = dvc_command(root, "repro", "--single-item", stage, timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise StageFailedError(f"stage {stage!r} failed (dvc repro exit {proc.returncode}):\n{_tail(output, 40)}")
    ran = "Running stage" in output
    return StageOutcome(stage=stage, ran=ran, seconds=seconds, log_tail=_tail(output, 20))


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
