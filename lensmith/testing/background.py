"""A command running in the background, in its own process group, for as long as a `with` block (test support)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def background(command: list[str], cwd: Path, env: dict[str, str], log: Path, stop: int = signal.SIGTERM) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running in its own process group until the block ends (`stop`, then SIGKILL after 30 s)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, stop)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
