"""The Prefect task runner a flow uses, chosen by params (`orchestration.task_runner`).

- thread: Prefect's ThreadPoolTaskRunner (tasks share this process; the default).
- dask: prefect-dask's DaskTaskRunner, on a temporary local cluster of `dask_n_workers` worker
  processes with `dask_threads_per_worker` threads each, or on an existing cluster at `dask_address`
  (workers on other machines need the same code installed and the data reachable: a shared filesystem, or
  `orchestration.artifact_store` (tasks/store_stages.py, docs/deployment.md)).
- ray: prefect-ray's RayTaskRunner when the `ray` extra is installed; a clear error otherwise.

`check_task_runner_reachable` is the flows' preflight: an existing Dask cluster that does not answer fails in
seconds with its address, before any stage runs.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from lensmith.errors import LensmithError
from lensmith.params import OrchestrationParams, Params


# A scheduler that answers does so in milliseconds. Unchecked, a closed port surfaces at the flow's first task
# submission, after distributed's 30 s connect timeout, as a flow-run OSError traceback naming no setting.
DASK_CONNECT_TIMEOUT_S = 5.0


class TaskRunnerUnavailableError(LensmithError):
    """The configured task runner's package is not installed."""


class DaskSchedulerUnreachableError(LensmithError):
    """orchestration.dask_address names no Dask scheduler that answers."""


def task_runner_for(params: Params) -> TaskRunner:
    """A fresh (not yet started) task runner for `params.orchestration.task_runner`."""
    orch = params.orchestration
    if orch.task_runner == "dask":
        return dask_task_runner(orch)
    if orch.task_runner == "ray":
        return ray_task_runner()
    return ThreadPoolTaskRunner(max_workers=orch.thread_max_workers)


def dask_cluster_kwargs(orch: OrchestrationParams) -> dict[str, object]:
    """LocalCluster arguments: worker processes (not threads) on loopback, no dashboard port to collide on."""
    return {
        "n_workers": orch.dask_n_workers,
        "threads_per_worker": orch.dask_threads_per_worker,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "env": dask_worker_env(orch),
    }


def prefect_api_url() -> str:
    """The API this process reports to; in ephemeral mode, the temporary server this process started."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or str(get_client(sync_client=True).api_url)


def dask_worker_env(orch: OrchestrationParams) -> dict[str, str]:
    """Worker processes report to the flow's Prefect API (without it each would start its own temporary
    server, ~5 s each and task runs invisible to the flow's), with BLAS/torch threads per worker capped."""
    threads = str(orch.dask_threads_per_worker)
    return {"PREFECT_API_URL": prefect_api_url(), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def dask_task_runner(orch: OrchestrationParams) -> TaskRunner:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise TaskRunnerUnavailableError(
            "orchestration.task_runner is 'dask' but prefect-dask is not installed; install the locked "
            "dependencies (pip install -r requirements.lock)"
        ) from None
    if orch.dask_address:
        return DaskTaskRunner(address=orch.dask_address)
    return DaskTaskRunner(cluster_kwargs=dask_cluster_kwargs(orch))


def ray_task_runner() -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise TaskRunnerUnavailableError(
            "orchestration.task_runner is 'ray' but prefect-ray is not installed (it is not part of the locked "
            "stack: ray adds ~20 packages); `pip install .[ray]`, or use 'dask' or 'thread'"
        ) from None
    return RayTaskRunner()


async def _scheduler_identity(address: str, timeout_s: float) -> dict[str, object]:
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout_s)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await asyncio.wait_for(comm.read(), timeout_s)
    finally:
        await comm.close()


def dask_scheduler_problem(address: str, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> str | None:
    """Why no Dask scheduler answers at `address` within about `timeout_s`, or None when one does."""
    try:
        # a thread of its own: the caller may already run an event loop (a Prefect flow)
        with ThreadPoolExecutor(max_workers=1) as pool:
            identity = pool.submit(asyncio.run, _scheduler_identity(address, timeout_s)).result()
    except Exception as exc:  # noqa: BLE001 - anything that is not a scheduler's answer is the problem
        return f"{type(exc).__name__}: {exc}"[:300]
    if not isinstance(identity, dict) or identity.get("type") != "Scheduler":
        return f"it answered, but not as a Dask scheduler ({str(identity)[:100]})"
    return None


def check_task_runner_reachable(orch: OrchestrationParams, timeout_s: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """Raise DaskSchedulerUnreachableError, naming orchestration.dask_address, when the existing Dask cluster the
    flow would run on does not answer; nothing to check for a local cluster or the thread runner."""
    if orch.task_runner != "dask" or not orch.dask_address:
        return
    problem = dask_scheduler_problem(orch.dask_address, timeout_s)
    if problem is not None:
        raise DaskSchedulerUnreachableError(
            f"orchestration.dask_address {orch.dask_address!r}: no Dask scheduler answers there ({problem}). "
            "Start one (`dask scheduler` and `dask worker ADDRESS` on the machines), fix the address, "
            "or set orchestration.dask_address=null for a local cluster"
        )
