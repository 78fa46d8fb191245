"""Training batches from the uint8 image cache, gathered ahead of the step that needs them.

While the device runs step k, one background thread gathers the next batches from the memmap. For a GPU
it gathers straight into page-locked (pinned) host memory, so the copy to the device is asynchronous
(`non_blocking`) and overlaps the step that is running; the batch crosses the bus as uint8, a quarter of
its float32 size, and is augmented on the device. On the CPU the same code runs without pinning: the
thread still overlaps the memmap reads with the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

PREFETCH_DEPTH = 2  # batches gathered ahead: one to overlap the step, one to absorb a slow read


@dataclass(frozen=True)
class HostBatch:
    """One batch in host memory, ready to move: `images` uint8 N x C x H x W, `labels` int64 N."""

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images uint8, labels) on `device`; asynchronous from pinned memory, a no-op on the CPU."""
        return self.images.to(device, non_blocking=True), self.labels.to(device, non_blocking=True)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    # torch's caching host allocator recycles pinned blocks once the copies reading them are done
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def gather(images: np.ndarray, index: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """uint8 batch from the memmap (sorted reads are sequential on disk; the order is restored)."""
    idx = index.numpy()
    order = np.argsort(idx, kind="stable")
    batch = host_tensor((len(idx), *images.shape[1:]), torch.uint8, pin)
    batch.numpy()[order] = images[idx[order]]
    return batch


def host_batch(images: np.ndarray, labels: np.ndarray | None, index: torch.Tensor, pin: bool) -> HostBatch:
    """The batch `index` of `images` (and of `labels`; None = no labels, e.g. for prediction)."""
    targets = host_tensor((len(index) if labels is not None else 0,), torch.int64, pin)
    if labels is not None:
        targets.numpy()[:] = labels[index.numpy()]
    return HostBatch(index=index, images=gather(images, index, pin), labels=targets)


def prefetched(
    images: np.ndarray, labels: np.ndarray | None, batches: Iterable[torch.Tensor], pin: bool, depth: int | None = None
) -> Iterator[HostBatch]:
    """`batches` (index tensors) as HostBatches in order, each gathered `depth` (default PREFETCH_DEPTH) steps
    ahead on a thread; depth 0 gathers each batch when it is asked for, in the calling thread.

    Closing the iterator early (an exception in the step, a stop) cancels what was not started and waits
    for the one gather in progress, so no thread outlives the epoch."""
    depth = PREFETCH_DEPTH if depth is None else depth
    if depth <= 0:
        for index in batches:
            yield host_batch(images, labels, index, pin)
        return
    pending: deque[Future[HostBatch]] = deque()
    upcoming = iter(batches)
    with ThreadPoolExecutor(1, thread_name_prefix="lensmith-prefetch") as pool:
        try:
            for index in islice(upcoming, depth):
                pending.append(pool.submit(host_batch, images, labels, index, pin))
            while pending:
                batch = pending.popleft().result()
                following = next(upcoming, None)
                if following is not None:
                    pending.append(pool.submit(host_batch, images, labels, following, pin))
                yield batch
        finally:
            for future in pending:
                future.cancel()
