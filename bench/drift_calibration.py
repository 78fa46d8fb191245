"""Drift calibration: is the retrain trigger right on shifted data and quiet on same-distribution data?

1. Demo data: train (lensmith.train.run_train) + export (lensmith.export.run_export) on sites A/B,
   build the drift reference, then
   - site C (darker, warmer light, other gloss) must be flagged;
   - 20 random windows of new, unseen A/B images (another seed: new batches) may raise at most 1 alarm.
2. Fashion-MNIST (Debian dataset-fashion-mnist): the same on a model trained on its train set;
   the plain test set must not be flagged, a brightness/contrast-shifted test set must be.

Usage: .venv/bin/python bench/drift_calibration.py [--windows 20] [--window-size 100] [--seed 0] [--keep DIR]
Prints one line per check and a summary table (the README figures).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.drift.reference import build_reference  # noqa: E402
from lensmith.drift.report import run_drift  # noqa: E402
from lensmith.layout import Layout  # noqa: E402
from lensmith.params import Params, params_from_dict  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def bench_params(epochs: int) -> Params:
    return params_from_dict(
        {
            "train": {"model": "efficientnet_lite0", "pretrained": True, "image_size": 64, "epochs": epochs, "batch_size": 32,
                      "freeze_epochs": 0, "warmup_epochs": 0},
            "export": {"int8": False, "bench_seconds": 0.2, "parity_max_images": 64, "parity_max_abs_diff": 1e-3},
            "drift": {"model": "candidate"},
        }
    )


def train_and_export(layout: Layout, params: Params) -> float:
    from lensmith.export import run_export
    from lensmith.train import run_train

    started = time.perf_counter()
    print(run_train(params, layout), flush=True)
    run_export(params, layout)
    build_reference(params, layout, layout.candidate)
    return time.perf_counter() - started


def write_splits(layout: Layout, frame: pd.DataFrame, split: pd.Series) -> None:
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        frame[split == name].reset_index(drop=True).to_parquet(layout.split_file(name), index=False)


def copy_window(files: list[Path], labels: list[str], target: Path) -> Path:
    for i, (file, label) in enumerate(zip(files, labels)):
        out = target / label / f"{i:05d}{file.suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, out)
    return target


def check(layout: Layout, params: Params, source: Path, name: str) -> dict:
    result = run_drift(params, layout, str(source))
    r = result.report
    row = {
        "check": name,
        "n": r["current"]["n_images"],
        "drifted": f"{r['drifted_columns']}/{r['n_columns']}",
        "share": round(r["drifted_share"], 3),
        "conf_now": None if r["confidence"]["now"] is None else round(r["confidence"]["now"], 3),
        "conf_ref": round(r["confidence"]["reference"], 3),
        "retrain": result.decision.retrain,
        "seconds": r["seconds"]["total"],
    }
    print(row, flush=True)
    return row


# ---- demo data ----------------------------------------------------------------------------------------------


def demo_checks(root: Path, windows: int, window_size: int, per_class: int, seed: int = 0) -> list[dict]:
    from bench._common import split_by_batch
    from lensmith.demodata import generate_demo_dataset

    layout = Layout(root / "demo")
    raw = layout.root / "data/raw/demo"
    generate_demo_dataset(raw, sites=None, seed=0, per_class=per_class, image_size=64)
    meta = pd.read_csv(raw / "metadata.csv")
    meta["file"] = [str(raw / p) for p in meta["path"]]
    write_splits(layout, meta, split_by_batch(meta))
    params = bench_params(epochs=3)
    print(f"demo: trained + exported + reference in {train_and_export(layout, params):.0f}s", flush=True)

    rows = []
    site_c = root / "site_c"
    generate_demo_dataset(site_c, sites=["C"], seed=0, per_class=max(20, window_size // 5), image_size=64)
    rows.append(check(layout, params, site_c, "demo site C (held back)"))

    fresh = root / "fresh_ab"
    generate_demo_dataset(fresh, sites=None, seed=1 + seed, per_class=max(40, window_size // 2), image_size=64)
    fresh_meta = pd.read_csv(fresh / "metadata.csv")
    rng = np.random.default_rng(seed)
    for w in range(windows):
        pick = fresh_meta.iloc[rng.choice(len(fresh_meta), size=min(window_size, len(fresh_meta)), replace=False)]
        folder = copy_window([fresh / p for p in pick["path"]], list(pick["label"]), root / f"window_{w:02d}")
        rows.append(check(layout, params, folder, f"demo A/B window {w + 1}"))
        shutil.rmtree(folder)
    return rows


# ---- Fashion-MNIST ------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_pngs(images: np.ndarray, labels: np.ndarray, target: Path) -> list[Path]:
    files = []
    for i, (img, label) in enumerate(zip(images, labels)):
        out = target / FMNIST_CLASSES[label] / f"{i:05d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(out)
        files.append(out)
    return files


def shifted(images: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """Contrast around mid-grey, then a brightness offset (an exposure/lighting change)."""
    x = (images.astype(np.float32) - 128.0) * contrast + 128.0 + brightness
    return np.clip(x, 0, 255).astype(np.uint8)


def fmnist_checks(root: Path, n_train: int, n_test: int) -> list[dict]:
    layout = Layout(root / "fmnist")
    train_x, train_y = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train_x), size=n_train + n_train // 5 + n_train // 5, replace=False)
    files = write_pngs(train_x[pick], train_y[pick], layout.root / "data/raw/fmnist")
    frame = pd.DataFrame({"file": [str(f) for f in files], "label": [FMNIST_CLASSES[y] for y in train_y[pick]]})
    split = pd.Series(["train"] * n_train + ["val"] * (n_train // 5) + ["test"] * (n_train // 5))
    write_splits(layout, frame, split)
    params = bench_params(epochs=2)
    print(f"fmnist: trained + exported + reference in {train_and_export(layout, params):.0f}s", flush=True)

    test_pick = rng.choice(len(test_x), size=n_test, replace=False)
    plain = root / "fmnist_test"
    write_pngs(test_x[test_pick], test_y[test_pick], plain)
    dark = root / "fmnist_test_shifted"
    write_pngs(shifted(test_x[test_pick], brightness=40.0, contrast=0.6), test_y[test_pick], dark)
    return [
        check(layout, params, plain, "fashion-mnist test (plain)"),
        check(layout, params, dark, "fashion-mnist test (brightness +40, contrast x0.6)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window-size", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=300,
                        help="demo training images per class (sites A+B): ~200 production batches. A reference of ~70 "
                        "batches (100/class) under-represents batch-level lighting/material and raises false alarms")
    parser.add_argument("--fmnist-train", type=int, default=2000)
    parser.add_argument("--fmnist-test", type=int, default=1000)
    parser.add_argument("--skip", choices=["demo", "fmnist"], default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the same-distribution windows (new A/B images: demo seed 1 + SEED; window draw: SEED)")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder, removed)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="lensmith-drift-cal-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    try:
        if args.skip != "demo":
            rows += demo_checks(root, args.windows, args.window_size, args.per_class, args.seed)
        if args.skip != "fmnist":
            rows += fmnist_checks(root, args.fmnist_train, args.fmnist_test)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    windows = table[table["check"].str.startswith("demo A/B window")]
    if len(windows):
        print(f"same-distribution windows: {int(windows['retrain'].sum())} false alarm(s) in {len(windows)} "
              f"(max drifted share {windows['share'].max():.2f}; min confidence {windows['conf_now'].min():.3f})")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
