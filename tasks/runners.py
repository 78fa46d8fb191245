"""The Prefect task runner a flow uses, chosen by params (`orchestration.task_runner`).

- thread: Prefect's ThreadPoolTaskRunner (tasks share this process; the default).
- dask: prefect-dask's DaskTaskRunner, on a temporary local cluster of `dask_n_workers` worker
  processes with `dask_threads_per_worker` threads each, or on an existing cluster at `dask_address`
  (workers on other machines need the same code installed and the data reachable: S3, see
  lensmith/remote.py and docs/deployment.md).
- ray: prefect-ray's RayTaskRunner when the `ray` extra is installed; a clear error otherwise.
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from lensmith.errors import LensmithError
from lensmith.params import OrchestrationParams, Params


class TaskRunnerUnavailableError(LensmithError):
    """The configured task runner's package is not installed."""


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
