"""Small process helpers: free ports, waiting for readiness, the cores this process may use, pools it may start."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.context import BaseContext
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback URL
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


CGROUP_CPU_LIMITS = (  # (quota file, period file or None): cgroup v2, then v1
    (Path("/sys/fs/cgroup/cpu.max"), None),
    (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
)


def cgroup_cpu_limit(files: tuple[tuple[Path, Path | None], ...] = CGROUP_CPU_LIMITS) -> float | None:
    """The container's CPU quota in cores (a Kubernetes `limits.cpu`), or None when there is none."""
    for quota_file, period_file in files:
        try:
            if period_file is None:
                quota, _, period = quota_file.read_text().strip().partition(" ")
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except OSError:
            continue
        if quota in ("max", "-1") or not period:
            return None
        try:
            return max(float(quota) / float(period), 0.0) or None
        except ValueError:
            return None
    return None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container CPU quota."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def may_start_processes() -> bool:
    """False in a daemonic process (a Dask worker, a multiprocessing pool worker): Python refuses it children
    ("daemonic processes are not allowed to have children")."""
    return not multiprocessing.current_process().daemon


def pool_executor(workers: int, mp_context: BaseContext | None = None) -> Executor:
    """A pool of `workers` processes, or of `workers` threads where this process may not start processes."""
    if may_start_processes():
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp_context)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool")
