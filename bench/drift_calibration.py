"""Drift calibration: is the retrain trigger quiet on fresh same-site data and loud on a new site or new light?

1. Demo data: train (lensmith.train.run_train) + export (lensmith.export.run_export) on sites A/B, build the drift
   reference (slices by site, false-alarm calibration on the held-out batches), then per window size
   (--sizes, default 1000 100 5000) through `run_drift`, the code behind `lensmith drift`:
   - per training site A and B, --windows fresh same-site windows, each `lensmith demo-data --site S` with a new
     seed (new batches, nothing else changed): every retrain is a false alarm (target <= 1 in 20);
   - --shift-windows windows of site C (held back: darker, warmer light, other gloss; a new site value), which must
     be flagged (target >= 19 in 20), and of site A with the light dimmed (brightness x0.75, site=A kept: compared
     with the site-A slice), which should be.
   Windows larger than drift.max_window_images (1000) are measured on its seeded sample, as in production.
2. Fashion-MNIST (Debian dataset-fashion-mnist): the same on a model trained on its train set;
   the plain test set must not be flagged, a brightness/contrast-shifted test set must be.

Usage: .venv/bin/python bench/drift_calibration.py [--windows 20] [--shift-windows 20] [--sizes 1000 100 5000]
       [--per-class 300] [--seed 0] [--skip fmnist] [--keep DIR] [--csv FILE] [--budget-minutes M]
Prints one line per window (and appends it to --csv), then the per-size, per-site table (the README figures).
With --budget-minutes it stops starting new windows after that long and says what was run.
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


def demo_project(root: Path, per_class: int) -> tuple[Layout, Params]:
    from bench._common import split_by_batch
    from lensmith.demodata import generate_demo_dataset

    layout = Layout(root / "demo")
    params = bench_params(epochs=3)
    if (layout.candidate / "drift_reference.json").is_file():
        build_reference(params, layout, layout.candidate)  # the model is kept; the reference follows the code
        return layout, params
    raw = layout.root / "data/raw/demo"
    generate_demo_dataset(raw, sites=None, seed=0, per_class=per_class, image_size=64)
    meta = pd.read_csv(raw / "metadata.csv")
    meta["file"] = [str(raw / p) for p in meta["path"]]
    write_splits(layout, meta, split_by_batch(meta))
    print(f"demo: trained + exported + reference in {train_and_export(layout, params):.0f}s", flush=True)
    return layout, params


def dimmed(folder: Path, factor: float) -> Path:
    """The window with every image's brightness scaled in place (metadata.csv kept: the same site, new light)."""
    from PIL import ImageEnhance

    for file in sorted(folder.rglob("*.jpg")):
        ImageEnhance.Brightness(Image.open(file).convert("RGB")).enhance(factor).save(file, quality=95)
    return folder


def window_check(layout: Layout, params: Params, folder: Path, kind: str, site: str, size: int, number: int) -> dict:
    result = run_drift(params, layout, str(folder))
    r = result.report
    judged = [v for v in r["slices"] if v["judged"]]
    row = {
        "kind": kind, "site": site, "size": size, "window": number, "n_measured": r["current"]["n_images"],
        "slices": " ".join(f"{v['key']}:{v['status']}" for v in r["slices"]),
        "share": max((v["drifted_share"] or 0.0) for v in judged) if judged else None,
        "threshold": min((v["threshold"] for v in judged if v["threshold"] is not None), default=None),
        "expected_fa": r["false_alarm"]["expected"],
        "drift": r["drift_detected"], "retrain": result.decision.retrain,
        "conf_drop": r["confidence"]["relative_drop"],  # the window's, against the whole reference's mean confidence
        # the slice's own drop (against its held-out mean confidence) and the calibrated drop threshold it is judged by
        "slice_conf_drop": max((v["confidence_drop"] for v in judged if v.get("confidence_drop") is not None), default=None),
        "conf_threshold": min((v["confidence_threshold"] for v in judged if v.get("confidence_threshold") is not None), default=None),
        "seconds": r["seconds"]["total"],
    }
    print(row, flush=True)
    return row


def demo_checks(root: Path, windows: int, shift_windows: int, sizes: list[int], per_class: int, seed: int,
                deadline: float, csv: Path | None) -> list[dict]:
    from lensmith.demodata import generate_demo_dataset

    layout, params = demo_project(root, per_class)
    plan = [(size, kind, site, w) for size in sizes
            for kind, site, count in (("fresh", "A", windows), ("fresh", "B", windows), ("site C", "C", shift_windows),
                                      ("dimmed A", "A", shift_windows))
            for w in range(count)]
    rows = []
    for size, kind, site, w in plan:
        if time.perf_counter() > deadline:
            print(f"budget spent: {len(rows)} of {len(plan)} windows run", flush=True)
            break
        folder = root / "window"
        window_seed = 1000 + seed * 100_000 + size * 10 + w  # a new seed per window: new batches
        started = time.perf_counter()
        generate_demo_dataset(folder, sites=[site], seed=window_seed, per_class=size // 5, image_size=64)
        generated = time.perf_counter() - started
        if kind == "dimmed A":
            dimmed(folder, 0.75)
        row = {**window_check(layout, params, folder, kind, site, size, w), "generate_s": round(generated, 1)}
        rows.append(row)
        if csv is not None:
            pd.DataFrame([row]).to_csv(csv, mode="a", header=not csv.is_file(), index=False)
        shutil.rmtree(folder)
    return rows


def demo_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per size and kind/site: windows run and how many retrained (false alarms for fresh windows)."""
    out = rows.groupby(["size", "kind", "site"], sort=False).agg(
        windows=("retrain", "size"), retrained=("retrain", "sum"), max_share=("share", "max"),
        threshold=("threshold", "median"), expected_fa=("expected_fa", "median"), seconds=("seconds", "median"),
        **({"max_conf_drop": ("slice_conf_drop", "max"), "conf_threshold": ("conf_threshold", "median")} if "conf_threshold" in rows else {}))
    return out.reset_index()


def rescore(csv: Path, layout: Layout, params: Params) -> pd.DataFrame:
    """Windows measured earlier (a --csv file), judged again at thresholds calibrated by this code on the stored
    reference rows of `layout` (as a rebuild would, without embedding the images again). A window's per-slice
    drifted share depends on the window and the reference's training rows only, not on the calibration, so a change
    of calibration is measured without generating the windows again."""
    from lensmith.drift.calibration import slice_threshold
    from lensmith.drift.reference import load_reference, reference_calibration, resampling_group

    reference = load_reference(layout.candidate)
    columns = [*reference.meta["stat_columns"], *reference.embedding_columns]
    dp = params.drift
    calibration = reference_calibration(reference.frame, columns, reference.slice_columns, dp,
                                        resampling_group(reference.frame, reference.context_columns))
    rows = pd.read_csv(csv)
    keys = ["site=" + s if s in ("A", "B") else "all" for s in rows["site"]]  # site C: a new value, the whole reference
    thresholds = [slice_threshold(calibration, k, columns, int(n), dp.false_alarm_rate, dp.share_threshold, dp.confidence_drop)
                  for k, n in zip(keys, rows["n_measured"])]
    rows["threshold"] = [t.share for t in thresholds]
    rows["expected_fa"] = [t.false_alarm_rate for t in thresholds]
    rows["conf_threshold"] = [dp.confidence_drop if t.confidence_drop is None else t.confidence_drop for t in thresholds]
    if "slice_conf_drop" not in rows:  # from the window's drop: its mean confidence against the slice's held-out mean
        now = reference.mean_confidence * (1 - rows["conf_drop"])
        slice_reference = pd.Series([t.confidence_reference or reference.mean_confidence for t in thresholds], index=rows.index)
        rows["slice_conf_drop"] = (slice_reference - now) / slice_reference
    drop = rows["slice_conf_drop"]
    rows["drift"] = (rows["share"] >= rows["threshold"] - 1e-9) | (rows["site"] == "C") | (drop >= rows["conf_threshold"] - 1e-12)
    rows["retrain"] = rows["drift"]
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
    parser.add_argument("--windows", type=int, default=20, help="fresh same-site windows per size and training site")
    parser.add_argument("--shift-windows", type=int, default=20, help="site C and dimmed site-A windows per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100, 5000])
    parser.add_argument("--per-class", type=int, default=300,
                        help="demo training images per class (sites A+B): ~200 production batches. A reference of ~70 "
                        "batches (100/class) under-represents batch-level lighting/material and raises false alarms")
    parser.add_argument("--fmnist-train", type=int, default=2000)
    parser.add_argument("--fmnist-test", type=int, default=1000)
    parser.add_argument("--skip", choices=["demo", "fmnist"], default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh windows (each window: its own demo seed)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="work folder to keep (default: a temp folder, removed); a kept trained model is reused")
    parser.add_argument("--csv", type=Path, default=None, help="append each window's row to this CSV")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no new window after this long")
    parser.add_argument("--rescore", type=Path, default=None,
                        help="a --csv of earlier windows: judge them again at the thresholds of the reference in --keep DIR")
    args = parser.parse_args()
    if args.rescore is not None:
        print(demo_summary(rescore(args.rescore, Layout(args.keep / "demo"), bench_params(epochs=3))).to_string(index=False))
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="lensmith-drift-cal-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + 60 * args.budget_minutes if args.budget_minutes else float("inf")
    demo_rows, rows = [], []
    try:
        if args.skip != "demo":
            demo_rows = demo_checks(root, args.windows, args.shift_windows, args.sizes, args.per_class, args.seed, deadline, args.csv)
        if args.skip != "fmnist":
            rows += fmnist_checks(root, args.fmnist_train, args.fmnist_test)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if demo_rows:
        print(demo_summary(pd.DataFrame(demo_rows)).to_string(index=False))
    if rows:
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
