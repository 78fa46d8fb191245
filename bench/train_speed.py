"""Training throughput: lensmith's loop vs a torchvision references/classification-style baseline.

Both train EfficientNet-Lite0 (pretrained, whole network unfrozen) with the same batch size, image size
and images, in one process, alternating A/B rounds of `--steps` optimiser steps; medians are compared.

  ours      decoded-once uint8 cache -> batch augmentation on tensors -> channels_last fp32
  baseline  ImageFolder + PIL decode every epoch + torchvision transforms, NCHW fp32, DataLoader(2 workers)

Also reports achieved GFLOP/s (FLOPs of one fwd+bwd step counted with FlopCounterMode).

  .venv/bin/python bench/train_speed.py --images 1000 --batch 64 --image-size 128 --rounds 3 --steps 6 [--source-size 512]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _common import demo_metadata, ensure_demo_data, limit_per_class  # noqa: I001
from lensmith.datacache import cached_images
from lensmith.models import build_model, preprocessing_for
from lensmith.params import TrainParams
from lensmith.splitdata import SplitData
from lensmith.batches import gather
from lensmith.train import EpochContext, batch_order, model_input
from lensmith.augment import augment_batch


def ours_step_runner(images, labels, tp: TrainParams):  # noqa: ANN001, ANN201
    prep = preprocessing_for(tp.model, tp.image_size)
    model = build_model(tp.model, 5, True, tp.dropout, tp.image_size).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    ctx = EpochContext(model, criterion, opt, None, None, torch.device("cpu"), prep, tp)  # type: ignore[arg-type]
    shuffle, augment = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    data = SplitData(images=images, labels=labels, files=[])
    batches: list[torch.Tensor] = []

    def run(steps: int) -> int:
        model.train()
        seen = 0
        for _ in range(steps):
            if not batches:
                batches.extend(batch_order(len(labels), tp.batch_size, shuffle))
            index = batches.pop(0)
            x = model_input(augment_batch(gather(data.images, index), tp.augment, augment), ctx)
            loss = criterion(model(x), torch.from_numpy(labels[index.numpy()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            seen += len(index)
        return seen

    return run, model, ctx


def baseline_step_runner(folder: Path, tp: TrainParams, workers: int):  # noqa: ANN201
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomResizedCrop(tp.image_size, scale=tp.augment.crop_scale),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[127 / 255] * 3, std=[128 / 255] * 3),
    ])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=tp.batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    model = build_model(tp.model, len(dataset.classes), True, tp.dropout, tp.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    iterator = iter(loader)

    def run(steps: int) -> int:
        nonlocal iterator
        model.train()
        seen = 0
        for _ in range(steps):
            try:
                x, y = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                x, y = next(iterator)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            seen += len(y)
        return seen

    return run


def flops_per_image(tp: TrainParams) -> float:
    """3 x the forward FLOPs (backward ~ 2 x forward). FlopCounterMode's own count of the backward pass
    came out ~13x the forward here, which looks like grouped (depthwise) convolution backward counted
    as dense, so only its forward count is trusted."""
    model = build_model(tp.model, 5, False, tp.dropout, tp.image_size).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, tp.image_size, tp.image_size))
    return 3.0 * counter.get_total_flops()


def image_folder(meta, root: Path) -> Path:  # noqa: ANN001
    """A class-per-folder tree of symlinks to the chosen images (what ImageFolder reads)."""
    for label, file in zip(meta["label"], meta["file"]):
        link = root / label / Path(file).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(file)
    return root


def timed(run, steps: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    seen = run(steps)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/lensmith-bench"))
    ap.add_argument("--images", type=int, default=1000, help="images per run (split evenly over classes)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per timed round")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source-size", type=int, default=128,
                    help="side of the stored JPEGs (demo data: 128 = the training size; camera frames are larger, e.g. 512)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    tp = TrainParams(image_size=args.image_size, batch_size=args.batch)
    if args.source_size == 128:
        demo = ensure_demo_data(args.work / "demo")
    else:
        demo = ensure_demo_data(args.work / f"demo-{args.source_size}px", per_class=args.images // 5, image_size=args.source_size)
    meta = limit_per_class(demo_metadata(demo), args.images // 5).reset_index(drop=True)
    folder = image_folder(meta, args.work / f"imagefolder-{args.images}-{args.source_size}px")
    classes = sorted(meta["label"].unique())
    labels = meta["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()

    start = time.perf_counter()
    images = cached_images([Path(f) for f in meta["file"]], meta["sha256"].tolist(),
                           preprocessing_for(tp.model, tp.image_size), args.work / "cache")
    cache_s = time.perf_counter() - start
    ours, _, _ = ours_step_runner(images, labels, tp)
    baseline = baseline_step_runner(folder, tp, args.workers)
    ours(1), baseline(1)  # warm-up: allocator, oneDNN primitives, worker start

    a, b = [], []
    for r in range(args.rounds):
        pair = [("ours", ours, a), ("baseline", baseline, b)]
        for name, run, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(timed(run, args.steps))
            print(f"round {r + 1} {name:8s} {out[-1]:7.1f} img/s", flush=True)
    fl = flops_per_image(tp)
    med_a, med_b = statistics.median(a), statistics.median(b)
    print(f"\nEfficientNet-Lite0 {args.image_size}px batch {args.batch}, {len(labels)} images stored as {args.source_size}px JPEG, "
          f"{args.rounds}x{args.steps} steps, baseline DataLoader workers {args.workers}")
    print(f"cache build (once): {cache_s:.1f}s for {len(labels)} images ({len(labels) / cache_s:.0f} img/s)")
    print(f"ours     median {med_a:7.1f} img/s  {med_a * fl / 1e9:6.1f} GFLOP/s")
    print(f"baseline median {med_b:7.1f} img/s  {med_b * fl / 1e9:6.1f} GFLOP/s")
    print(f"speed-up {med_a / med_b:.2f}x (target >= 1.5x); fwd+bwd {fl / 1e9:.3f} GFLOP/image")


if __name__ == "__main__":
    main()
