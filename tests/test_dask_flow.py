"""The training flow under the Dask task runner (issue #19): stages that parallelise internally run inside
daemonic Dask worker processes, the whole flow equals the thread runner's, and an unreachable scheduler fails
in seconds with its address."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from lensmith.demodata import generate_demo_dataset
from lensmith.layout import Layout
from lensmith.params import load_params
from lensmith.procutil import free_port, pool_executor, wait_until
from lensmith.stages import run_stage
from lensmith.testing.project import REPO, TINY_OVERRIDES, make_project, run, tool_env
from tasks.runners import check_task_runner_reachable, dask_scheduler_problem

# reports/metrics.json fields that differ between two thread-runner runs of two fresh projects (all 387 others are
# equal): measured speed, the project's git commit, and the manifest's hash (it records the demo images' mtimes).
RUN_DEPENDENT_KEYS = frozenset({"throughput", "git_commit", "data_hash"})


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """One worker process, as `orchestration.task_runner: dask` starts them (daemonic, like every Nanny worker)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def pool_kind() -> tuple[bool, str]:
    return multiprocessing.current_process().daemon, type(pool_executor(2)).__name__


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pools_are_threads_inside_a_dask_worker_and_processes_here(dask_client: Any) -> None:
    assert pool_kind() == (False, ProcessPoolExecutor.__name__)
    assert dask_client.submit(pool_kind, pure=False).result() == (True, ThreadPoolExecutor.__name__)


def test_demo_data_and_ingest_run_on_a_dask_worker_as_they_do_here(dask_client: Any, tmp_path: Path) -> None:
    """The user's report: ingest's process pool inside a Dask worker raised "daemonic processes are not allowed
    to have children". Now its (and demo data's) pool is a thread pool there, with the same output."""
    here, there = tmp_path / "here", tmp_path / "there"
    options = {"sites": None, "seed": 3, "per_class": 8, "image_size": 48}  # 40 images: above ingest's pool threshold
    generate_demo_dataset(here / "data/raw/demo", workers=1, **options)
    # partial: Client.submit has a `workers` argument of its own
    dask_client.submit(partial(generate_demo_dataset, there / "data/raw/demo", workers=2, **options), pure=False).result()
    assert tree_digest(there / "data/raw/demo") == tree_digest(here / "data/raw/demo")

    base = TINY_OVERRIDES + ["validate.min_images_per_class=2"]
    run_stage("ingest", load_params(REPO / "params.yaml", base + ["data.workers=1"]), Layout(here))
    dask_client.submit(run_stage, "ingest", load_params(REPO / "params.yaml", base + ["data.workers=2"]), Layout(there)).result()
    serial, on_worker = (pd.read_parquet(root / "data/manifest.parquet") for root in (here, there))
    assert len(serial) == 40
    pd.testing.assert_frame_equal(on_worker.drop(columns=["mtime_ns"]), serial.drop(columns=["mtime_ns"]))


def test_a_dask_scheduler_answers_and_a_closed_port_is_named_in_seconds(dask_client: Any) -> None:
    assert dask_scheduler_problem(dask_client.scheduler.address) is None
    closed = f"tcp://127.0.0.1:{free_port()}"
    params = load_params(REPO / "params.yaml", ["orchestration.task_runner=dask", f"orchestration.dask_address={closed}"])
    start = time.perf_counter()
    with pytest.raises(Exception, match=rf"orchestration.dask_address '{closed}': no Dask scheduler answers"):
        check_task_runner_reachable(params.orchestration, timeout_s=2)
    assert time.perf_counter() - start < 10
    check_task_runner_reachable(load_params(REPO / "params.yaml", ["orchestration.task_runner=dask"]).orchestration)  # local


@pytest.mark.slow
def test_lensmith_run_with_an_unreachable_scheduler_is_a_clear_error_before_any_stage(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    closed = f"tcp://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    proc = run(
        [sys.executable, "-m", "lensmith.cli", "run", "--set", "orchestration.task_runner=dask", "--set", f"orchestration.dask_address={closed}"],
        root, env=tool_env(), check=False, timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert "orchestration.dask_address" in proc.stderr and closed in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (root / "data" / "manifest.parquet").exists() and not (root / "data" / "raw").exists()  # no stage ran
    assert seconds < 45, seconds  # the CLI's own start (imports, ~10-20 s on 2 busy cores) + the 5 s check


def without_run_dependent(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: without_run_dependent(v) for k, v in doc.items() if k not in RUN_DEPENDENT_KEYS}
    if isinstance(doc, list):
        return [without_run_dependent(v) for v in doc]
    return doc


def weights_sha256(path: Path) -> str:
    """Hash of the state dict's tensors in key order (the checkpoint file also holds run-dependent fields)."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def existing_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` + `dask worker --nworkers 2` processes on loopback, as an operator starts them; its address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = tool_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    logs = [open(tmp_path / name, "wb") for name in ("scheduler.log", "worker.log")]  # noqa: SIM115 - closed below
    commands = [
        ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        ["distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
    ]
    procs = [
        subprocess.Popen([sys.executable, "-m", *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for command, log in zip(commands, logs, strict=True)
    ]
    try:
        assert wait_until(lambda: dask_scheduler_problem(address, timeout_s=1) is None, timeout_s=60)
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        for log in logs:
            log.close()


def flow_run(root: Path, sets: list[str]) -> str:
    command = [sys.executable, "-m", "lensmith.cli", "run"]
    for setting in sets:
        command += ["--set", setting]
    return run(command, root, timeout=600).stdout


RUNNERS = {  # compared with the session's thread-runner project (tests/conftest.py)
    "dask-local": ["orchestration.task_runner=dask", "orchestration.dask_n_workers=2"],
    "dask-existing": ["orchestration.task_runner=dask"],  # + dask_address, from the fixture
}


@pytest.mark.slow
def test_training_flow_on_dask_clusters_equals_the_thread_runner(tmp_path: Path, existing_cluster: str, thread_runner_project: Path) -> None:
    """`lensmith run` on tiny real demo data (demo data, ingest, validate, split, train, evaluate, export, drift
    reference, gate) in a fresh project per runner: the thread runner, a local 2-worker Dask cluster, and an existing
    cluster at orchestration.dask_address; the same metrics and the same weights."""
    sets = {"dask-local": RUNNERS["dask-local"], "dask-existing": [*RUNNERS["dask-existing"], f"orchestration.dask_address={existing_cluster}"]}
    roots = {runner: make_project(tmp_path / runner) for runner in sets}
    outputs = {runner: flow_run(roots[runner], sets[runner]) for runner in sets}
    roots["thread"] = thread_runner_project  # the same tiny project run on the thread runner (a session fixture)
    for runner, stdout in outputs.items():
        assert "reports:" in stdout and " ran " in stdout, (runner, stdout[-2000:])

    metrics = {r: without_run_dependent(json.loads((root / "reports" / "metrics.json").read_text())) for r, root in roots.items()}
    as_bytes = {r: json.dumps(m, sort_keys=True).encode() for r, m in metrics.items()}
    weights = {r: weights_sha256(root / "models" / "candidate" / "model.pt") for r, root in roots.items()}
    for runner in ("dask-local", "dask-existing"):
        assert metrics[runner] == metrics["thread"], runner
        assert as_bytes[runner] == as_bytes["thread"], runner
        assert weights[runner] == weights["thread"], runner
        for name in ("data/manifest.parquet", "data/splits/train.parquet"):
            frames = [pd.read_parquet(roots[r] / name).drop(columns=["mtime_ns"], errors="ignore") for r in ("thread", runner)]
            pd.testing.assert_frame_equal(frames[1], frames[0])
