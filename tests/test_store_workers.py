"""Workers that share no disk with the project (issue #19): `orchestration.artifact_store` on a real S3 server
(SeaweedFS), two `dask worker` processes each in a scratch folder of its own, `orchestration.dask_address` at their
scheduler. The flow's results equal a thread-runner run's; a worker killed mid-stage costs nothing but time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lensmith.procutil import free_port, wait_until
from lensmith.remote import TEMPORARY_MARK
from lensmith.testing.project import REPO, make_project, run, tool_env
from lensmith.testing.s3server import S3Server
from tasks.runners import dask_scheduler_problem
from test_dask_flow import weights_sha256, without_run_dependent

pytestmark = [pytest.mark.slow, pytest.mark.s3]

RAN_ON = re.compile(r"(\w+) ran on a worker \(host \S+ pid (\d+) cwd (\S+) scratch (\S+)\)")


@dataclass(frozen=True)
class StoreCluster:
    address: str
    folders: list[Path]  # each worker's working and local directory
    workers: list[subprocess.Popen[bytes]]


def s3_env(server: S3Server, tmp_path: Path) -> dict[str, str]:
    return tool_env({
        **server.env,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })


@pytest.fixture
def store_cluster(tmp_path: Path, s3_server: S3Server) -> Iterator[StoreCluster]:
    """`dask scheduler` and two `dask worker` processes on loopback, each worker in a folder of its own (its cwd and
    --local-directory), none in the project."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = s3_env(s3_server, tmp_path)
    folders = [tmp_path / f"worker{i}" for i in range(2)]
    commands = [(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], tmp_path)]
    commands += [
        (["distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
          "--local-directory", str(folder)], folder)
        for folder in folders
    ]
    procs = []
    for i, (command, cwd) in enumerate(commands):
        cwd.mkdir(exist_ok=True)
        with open(tmp_path / f"dask{i}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        assert wait_until(lambda: dask_scheduler_problem(address, timeout_s=1) is None, timeout_s=60)
        assert wait_until(lambda: all(any(f.glob("dask-scratch-space/worker-*")) for f in folders), timeout_s=60)
        yield StoreCluster(address, folders, procs[1:])
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def flow_command(sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "lensmith.cli", "run", *[word for setting in sets for word in ("--set", setting)]]


def store_sets(cluster: StoreCluster, store: str) -> list[str]:
    return ["orchestration.task_runner=dask", f"orchestration.dask_address={cluster.address}", f"orchestration.artifact_store={store}"]


@pytest.fixture
def thread_run(thread_runner_project: Path) -> Path:
    """The reference: the same tiny project run on the thread runner, in its own folder (shared with test_dask_flow)."""
    return thread_runner_project


def metrics_of(root: Path) -> dict:
    return without_run_dependent(json.loads((root / "reports" / "metrics.json").read_text()))


def stored_keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def project_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.relative_to(root).parts[0] in (".git", ".dvc")}


def ran_on(output: str) -> dict[str, tuple[int, Path, Path]]:
    """stage -> (pid, cwd, scratch) of the worker that ran it, from the flow's log."""
    return {m[1]: (int(m[2]), Path(m[3]), Path(m[4])) for m in RAN_ON.finditer(output)}


def assert_same_results_as(reference: Path, root: Path) -> None:
    assert metrics_of(root) == metrics_of(reference)
    assert weights_sha256(root / "models/candidate/model.pt") == weights_sha256(reference / "models/candidate/model.pt")
    status = run([sys.executable, "-m", "dvc", "status"], root).stdout
    assert "up to date" in status, status  # DVC's lock records every stage's run


def test_training_flow_on_workers_without_the_project_disk(tmp_path: Path, s3_server: S3Server, store_cluster: StoreCluster, thread_run: Path) -> None:
    root = make_project(tmp_path / "proj")
    bucket = s3_server.make_bucket("store")
    start = time.perf_counter()
    proc = run(flow_command(store_sets(store_cluster, f"s3://{bucket}/proj")), root, env=s3_env(s3_server, tmp_path), timeout=600)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr

    assert_same_results_as(thread_run, root)
    workers = ran_on(output)
    assert {"demo_data", "ingest", "validate", "split", "train", "evaluate", "export", "gate"} <= set(workers), output[-3000:]
    for stage, (_, cwd, scratch) in workers.items():
        assert cwd in store_cluster.folders, (stage, cwd)
        assert scratch.is_relative_to(cwd) and not scratch.exists(), (stage, scratch)  # its own scratch, cleaned up
    assert not any(p.is_relative_to(root) for _, cwd, scratch in workers.values() for p in (cwd, scratch))
    # nothing beyond what the stages declare; the thread run also kept its undeclared caches and labels.lock.json
    # (written beside the project by the stages; a worker's copy stays in its scratch: see docs/deployment.md)
    assert project_files(root) == {f for f in project_files(thread_run) if not f.startswith(".cache/") and f != "labels.lock.json"}
    keys = stored_keys(s3_server, bucket)
    assert "proj/models/candidate/model.pt" in keys and "proj/data/manifest.parquet" in keys
    assert not [k for k in keys if TEMPORARY_MARK in k]
    assert not [k for k in keys if k.startswith("proj/lensmith/")]  # code never travels: workers run their own
    print(f"flow through the store on 2 workers: {seconds:.0f}s; stages on {sorted({str(c) for _, c, _ in workers.values()})}")


def train_scratch(folders: list[Path]) -> tuple[int, Path] | None:
    """(worker index, scratch) of a train stage under way on one of the workers, once its inputs are arriving."""
    for i, folder in enumerate(folders):
        for scratch in folder.glob("dask-scratch-space/worker-*/lensmith-train-*"):
            if (scratch / "data" / "splits").is_dir():
                return i, scratch
    return None


def test_a_worker_killed_mid_train_the_stage_reruns_on_the_other(
    tmp_path: Path, s3_server: S3Server, store_cluster: StoreCluster, thread_run: Path
) -> None:
    root = make_project(tmp_path / "proj")
    bucket = s3_server.make_bucket("store-kill")
    command = flow_command(store_sets(store_cluster, f"s3://{bucket}/proj"))
    with open(tmp_path / "flow.log", "w+b") as log:
        flow = subprocess.Popen(command, cwd=root, env=s3_env(s3_server, tmp_path), stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_until(lambda: train_scratch(store_cluster.folders) is not None or flow.poll() is not None, timeout_s=400, interval_s=0.05)
            found = train_scratch(store_cluster.folders)
            assert found is not None, log.seek(0) or log.read().decode()[-3000:]
            killed, scratch = found
            time.sleep(1.0)
            assert scratch.exists() and not (scratch / "models" / "candidate" / "model.pt").exists()  # still mid-stage
            os.killpg(store_cluster.workers[killed].pid, signal.SIGKILL)
            store_cluster.workers[killed].wait(timeout=30)
            flow.wait(timeout=400)
        finally:
            if flow.poll() is None:
                flow.kill()
        log.seek(0)
        output = log.read().decode(errors="replace")

    keys = stored_keys(s3_server, bucket)
    assert not [k for k in keys if TEMPORARY_MARK in k], keys
    if flow.returncode != 0:  # no worker could take it over: the flow names the stage
        assert "stage 'train' failed on a worker" in output, output[-4000:]
        return
    assert_same_results_as(thread_run, root)
    survivor = store_cluster.folders[1 - killed]
    assert ran_on(output)["train"][1] == survivor, output[-4000:]
