"""DistributedDataParallel plumbing for `lensmith train` under `torchrun --nproc_per_node=N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them (or with
WORLD_SIZE=1) every helper here is a no-op and training is the single-process path, unchanged.

Sharding (DistributedSampler semantics on the cached uint8 tensors): every rank draws the same epoch
permutation and the same global batches (`train.batch_size` images, one shared seeded generator), and
takes its strided shard of each batch, so the number of optimizer steps, the LR schedule and the
gradient (DDP averages the ranks' mean losses) match the single-process run. Only rank 0 writes
checkpoints, dvclive metrics, meta and logs; the others wait at a barrier before reading what it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lensmith.procutil import available_cores


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_torchrun(processes: int) -> bool:
    """True when training asks for more processes than this launch has (i.e. not yet under torchrun)."""
    return processes > 1 and launched_world_size() == 1


def torchrun_command(processes: int, cli_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` on this machine (--standalone: a free local rendezvous port)
    running `python -m lensmith.cli <cli_args>` in `processes` ranks."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "lensmith.cli", *cli_args]


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); SINGLE_PROCESS when not launched so."""
    if launched_world_size() <= 1:
        return SINGLE_PROCESS
    import torch.distributed as dist

    ctx = DistContext(int(os.environ["RANK"]), launched_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx


def rank_device(device: torch.device, dist_ctx: DistContext) -> torch.device:
    """cuda -> this rank's GPU (cuda:LOCAL_RANK); cpu unchanged."""
    if device.type != "cuda" or not dist_ctx.enabled:
        return device
    torch.cuda.set_device(dist_ctx.local_rank)
    return torch.device("cuda", dist_ctx.local_rank)


def default_threads(dist_ctx: DistContext) -> int:
    """CPU threads per process when train.num_threads is 0: the cores this process may use (its affinity and
    container quota, not the host's count: a Dask worker in a pod), shared among the ranks on this machine."""
    cores = available_cores()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_ctx.world_size))
    return max(1, cores // local_world) if dist_ctx.enabled else cores


def rank_batches(batches: list[torch.Tensor], dist_ctx: DistContext) -> list[torch.Tensor]:
    """This rank's strided shard of every global batch; batches too small to give each rank 2 images
    (BatchNorm cannot train on one) are dropped on all ranks alike."""
    if not dist_ctx.enabled:
        return batches
    n = dist_ctx.world_size
    return [b[dist_ctx.rank :: n] for b in batches if len(b) >= 2 * n]


def rank_seed(seed: int, dist_ctx: DistContext) -> int:
    """Augmentation seed per rank (each rank augments different images; rank 0 keeps the single-process seed)."""
    return seed + 1_000_003 * dist_ctx.rank


def wrap_model(model: nn.Module, device: torch.device, dist_ctx: DistContext, find_unused: bool) -> nn.Module:
    """DDP around `model` (which stays the module to save); `model` itself when not distributed."""
    if not dist_ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def barrier(dist_ctx: DistContext) -> None:
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_first(dist_ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the shared image cache); the others run it after."""
    if not dist_ctx.is_main:
        barrier(dist_ctx)
    yield
    if dist_ctx.is_main:
        barrier(dist_ctx)


def sync_buffers(model: nn.Module, dist_ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running stats) to every rank, so evaluation and early stopping agree."""
    if not dist_ctx.enabled:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def mean_over_ranks(metrics: dict[str, float], keys: tuple[str, ...], dist_ctx: DistContext) -> dict[str, float]:
    """Average the given per-rank metrics (train loss/accuracy on each rank's shard) over ranks."""
    if not dist_ctx.enabled:
        return metrics
    import torch.distributed as dist

    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**metrics, **{k: float(v) / dist_ctx.world_size for k, v in zip(keys, values, strict=True)}}


def finish(dist_ctx: DistContext) -> None:
    """Wait for rank 0's writes, then leave the process group."""
    if not dist_ctx.enabled:
        return
    import torch.distributed as dist

    barrier(dist_ctx)
    dist.destroy_process_group()


class NoLive:
    """dvclive stand-in for ranks other than 0."""

    step = 0

    def log_metric(self, *_: object, **__: object) -> None:
        return None

    def next_step(self) -> None:
        return None

    def end(self) -> None:
        return None
