"""The training epoch (lensmith.train.train_one_epoch) with batches gathered ahead on a thread vs gathered
in the loop: the same model, data, augmentation and optimizer; only lensmith.batches.PREFETCH_DEPTH differs
(2 = the default, 0 = the baseline: each batch read from the memmap when the step asks for it).

Rounds alternate the order of A and B; medians of images/s are compared. On CUDA (when present) the
batches are also pinned and moved asynchronously, which is where prefetching is meant to pay; on a
2-core CPU it shows what the extra thread costs or saves next to the step.

  .venv/bin/python bench/train_loop.py --images 640 --batch 64 --image-size 128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith import batches as batches_module  # noqa: E402
from lensmith import train as t  # noqa: E402
from lensmith.models import build_model, preprocessing_for  # noqa: E402
from lensmith.params import TrainParams  # noqa: E402
from lensmith.splitdata import SplitData  # noqa: E402


def memmap_cache(folder: Path, n: int, size: int, seed: int) -> np.ndarray:
    """A uint8 N x 3 x size x size cache on disk, read back as a memmap (as lensmith.datacache gives it)."""
    path = folder / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    images[:] = np.random.default_rng(seed).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    return np.load(path, mmap_mode="r")


def epoch_context(tp: TrainParams, classes: int, device: torch.device) -> t.EpochContext:
    model = build_model(tp.model, classes, False, tp.dropout, tp.image_size).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = t.build_optimizer(model, tp, device)
    scheduler = t.build_scheduler(optimizer, tp, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    return t.EpochContext(model, criterion, optimizer, scheduler, scaler, device, preprocessing_for(tp.model, tp.image_size), tp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = t.resolve_device(args.device)
    if device.type == "cuda":
        t.configure_cuda()
    torch.set_num_threads(torch.get_num_threads())
    tp = TrainParams(image_size=args.image_size, batch_size=args.batch, pretrained=False, epochs=100, freeze_epochs=0, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        images = memmap_cache(Path(tmp), args.images, args.image_size, 0)
        labels = np.arange(args.images, dtype=np.int64) % 5
        data = SplitData(images=images, labels=labels, files=[])
        ctx = epoch_context(tp, 5, device)
        shuffle, augment = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        t.train_one_epoch(ctx, data, shuffle, augment, 0)  # warm-up: allocator, cuDNN autotuning, page cache
        rates: dict[str, list[float]] = {"prefetch (depth 2)": [], "in the loop (depth 0)": []}
        depths = {"prefetch (depth 2)": 2, "in the loop (depth 0)": 0}
        for round_ in range(args.rounds):
            order = list(depths) if round_ % 2 == 0 else list(reversed(depths))
            for name in order:
                batches_module.PREFETCH_DEPTH = depths[name]
                rates[name].append(t.train_one_epoch(ctx, data, shuffle, augment, round_ + 1)["train_images_per_second"])
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f} img/s" for n in order), flush=True)
    ours, base = (statistics.median(rates[n]) for n in depths)
    print(f"device {device}, {args.images} images of {args.image_size} px, batch {args.batch}, {args.rounds} rounds")
    print(f"median: prefetch {ours:.1f} img/s, in the loop {base:.1f} img/s -> {ours / base:.3f}x")


if __name__ == "__main__":
    main()
