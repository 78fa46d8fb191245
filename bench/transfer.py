"""Transfer learning earns its keep: 50 labelled images per class of the demo data, pretrained
EfficientNet-Lite0 vs the same model from random init, test accuracy (target: >= 10 points better).

With --defaults: the whole demo set with default train params, test macro-F1 (target >= 0.95).

  .venv/bin/python bench/transfer.py [--per-class 50] [--image-size 128] [--epochs 12]
  .venv/bin/python bench/transfer.py --defaults
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import demo_metadata, ensure_demo_data, limit_per_class, split_by_batch, test_scores, write_splits  # noqa: I001
from lensmith.params import Params
from lensmith.train import run_train


def train_and_score(root: Path, meta, split, train_params: dict) -> dict[str, float]:  # noqa: ANN001
    layout = write_splits(root, meta, split)
    start = time.perf_counter()
    summary = run_train(Params.model_validate({"train": train_params}), layout)
    scores = test_scores(layout)
    scores["train_seconds"] = time.perf_counter() - start
    print(summary)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/lensmith-bench"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--defaults", action="store_true", help="full demo set, default train params")
    args = ap.parse_args()

    meta = demo_metadata(ensure_demo_data(args.work / "demo"))
    split = split_by_batch(meta)
    if args.defaults:
        scores = train_and_score(args.work / "defaults", meta, split, {})
        print(f"default params on the demo set: {scores} (target test_macro_f1 >= 0.95)")
        return

    few = limit_per_class(meta[split == "train"], args.per_class).index
    keep = split.copy()
    keep[(split == "train") & ~meta.index.isin(few)] = "unused"
    common = {"image_size": args.image_size, "epochs": args.epochs, "early_stopping_patience": args.epochs}
    results = {}
    for pretrained in (True, False):
        name = "pretrained" if pretrained else "random_init"
        results[name] = train_and_score(
            args.work / f"transfer-{name}", meta, keep, {**common, "pretrained": pretrained, "freeze_epochs": 1 if pretrained else 0}
        )
        print(name, results[name], flush=True)
    gain = 100 * (results["pretrained"]["test_accuracy"] - results["random_init"]["test_accuracy"])
    print(f"\n{args.per_class} images/class, {args.image_size}px, {args.epochs} epochs")
    for name, r in results.items():
        print(f"{name:12s} test accuracy {r['test_accuracy']:.3f} macro-F1 {r['test_macro_f1']:.3f} ({r['train_seconds']:.0f}s)")
    print(f"pretrained - random init = {gain:+.1f} points (target >= +10)")


if __name__ == "__main__":
    main()
