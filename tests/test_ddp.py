"""`lensmith train` under torchrun: DistributedDataParallel with 2 CPU processes (gloo) matches single-process accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lensmith.distributed import SINGLE_PROCESS, DistContext, rank_batches
from lensmith.testing.project import run, tool_env
from test_task_runner import split_project

# Enough val images that one point means something (~1 image in 100), pretrained backbone, 2 epochs at 64 px.
DDP_OVERRIDES = ["demo.per_class=120", "train.epochs=2", "train.batch_size=32", "train.early_stopping_patience=5"]


def test_rank_batches_shard_every_batch_without_overlap() -> None:
    import torch

    batches = list(torch.arange(70).split(32))  # 32, 32, 6
    assert rank_batches(batches, SINGLE_PROCESS) is batches
    shards = [rank_batches(batches, DistContext(rank=r, world_size=2)) for r in (0, 1)]
    for step in range(3):
        both = torch.cat([shards[0][step], shards[1][step]])
        assert sorted(both.tolist()) == sorted(batches[step].tolist())
    tiny = [torch.arange(3)]  # a rank would get a single image: dropped on every rank
    assert rank_batches(tiny, DistContext(rank=0, world_size=2)) == [] == rank_batches(tiny, DistContext(rank=1, world_size=2))


def test_train_processes_relaunch_only_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.distributed import needs_torchrun, torchrun_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert needs_torchrun(2) and not needs_torchrun(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not needs_torchrun(2), "already a torchrun rank: never relaunch again"
    cmd = torchrun_command(2, ["train", "--set", "train.epochs=1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lensmith.cli",
                       "train", "--set", "train.epochs=1"]


def trained_meta(root: Path) -> dict:
    return json.loads((root / "models" / "candidate" / "meta.json").read_text())


@pytest.mark.slow
def test_two_process_ddp_reaches_single_process_accuracy(tmp_path: Path) -> None:
    root = split_project(tmp_path / "proj", DDP_OVERRIDES)
    cli = [sys.executable, "-m", "lensmith.cli", "train", "--root", str(root), "--params", str(root / "params.yaml")]
    run(cli, root, timeout=300)
    single = trained_meta(root)

    # train.processes=2: `lensmith train` relaunches itself under torchrun (what `dvc repro` and the flows run)
    proc = run([*cli, "--set", "train.processes=2"], root, env=tool_env({"OMP_NUM_THREADS": "1"}), timeout=300)
    ddp = trained_meta(root)

    assert "relaunching under torchrun" in proc.stdout
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in single
    assert ddp["num_images"] == single["num_images"] and ddp["num_images"]["val"] >= 80
    assert ddp["epochs_run"] == single["epochs_run"] == 2
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone logs
    acc_single, acc_ddp = single["best_val_metrics"]["val_accuracy"], ddp["best_val_metrics"]["val_accuracy"]
    print(f"val accuracy: single process {acc_single:.4f}, DDP x2 {acc_ddp:.4f} on {single['num_images']['val']} images")
    assert acc_ddp >= acc_single - 0.01
