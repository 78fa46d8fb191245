"""lensmith.batches: batches gathered ahead on a thread, in order, with their labels; nothing outlives an epoch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lensmith.batches import gather, host_batch, prefetched


def cache(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 4, 4), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64) % 3


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lensmith-prefetch")]


def test_batches_come_in_order_with_their_images_and_labels() -> None:
    images, labels = cache()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batches = list(order.split(5))
    got = list(prefetched(images, labels, batches, pin=False))
    assert [b.index.tolist() for b in got] == [b.tolist() for b in batches]
    for batch in got:
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 4, 4)
        assert batch.images[:, 0, 0, 0].tolist() == batch.index.tolist()  # image i holds the value i
        assert batch.labels.tolist() == (batch.index % 3).tolist()
    assert not prefetch_threads()


def test_depth_zero_gathers_in_the_calling_thread_with_the_same_batches() -> None:
    images, labels = cache()
    batches = list(torch.randperm(len(images), generator=torch.Generator().manual_seed(1)).split(4))
    ahead = list(prefetched(images, labels, batches, pin=False))
    inline = prefetched(images, labels, batches, pin=False, depth=0)
    first = next(inline)
    assert not prefetch_threads()
    for a, b in zip(ahead, [first, *inline]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_without_labels_and_with_an_empty_epoch() -> None:
    images, _ = cache(7)
    batches = list(prefetched(images, None, torch.arange(7).split(3), pin=False))
    assert [len(b.images) for b in batches] == [3, 3, 1] and all(len(b.labels) == 0 for b in batches)
    assert list(prefetched(images, None, [], pin=False)) == []


def test_leaving_an_epoch_early_stops_the_gathering() -> None:
    images, labels = cache(100)
    iterator = prefetched(images, labels, torch.arange(100).split(2), pin=False)
    next(iterator)
    iterator.close()  # what an exception in the training step does to the loop's generator
    assert not prefetch_threads()


def test_a_failed_read_is_raised_in_the_training_loop() -> None:
    images, labels = cache(10)
    with pytest.raises(IndexError):
        list(prefetched(images, labels, [torch.tensor([0, 1]), torch.tensor([50])], pin=False))
    assert not prefetch_threads()


def test_gather_restores_the_requested_order() -> None:
    images, labels = cache(10)
    index = torch.tensor([7, 2, 9, 2])
    assert gather(images, index)[:, 0, 0, 0].tolist() == [7, 2, 9, 2]
    assert host_batch(images, labels, index, pin=False).labels.tolist() == [1, 2, 0, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a CUDA device (none on this machine)")
def test_pinned_batches_reach_the_gpu_intact() -> None:
    images, labels = cache()
    for batch in prefetched(images, labels, torch.arange(len(images)).split(8), pin=True):
        assert batch.images.is_pinned() and batch.labels.is_pinned()
        on_gpu, targets = batch.to(torch.device("cuda"))
        assert torch.equal(on_gpu.cpu(), batch.images) and torch.equal(targets.cpu(), batch.labels)
