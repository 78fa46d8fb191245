"""Benchmark: the GX data gate on a 100k-row synthetic manifest (target < 5 s).

Prints the median of 3 end-to-end `run_validate` runs (read parquet, near-duplicate grouping,
GX suite, both reports) and the median breakdown: near-duplicate grouping vs the GX run. CPU time
is printed beside wall time because on a shared machine wall time mostly measures the neighbours.
Usage: .venv/bin/python bench/validate.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.validate import class_count_frame, manifest_checks, run_validate, with_derived_columns
from lensmith.validation import gxrun

LABELS = ["ok", "crack", "scratch", "stain", "pitting"]


def synthetic_manifest(rows: int, seed: int = 0, near_duplicate_share: float = 0.02) -> pd.DataFrame:
    """Realistic ingest-shaped columns; a share of rows are near-duplicates (1-3 phash bits flipped)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(LABELS, rows, p=[0.4, 0.15, 0.15, 0.15, 0.15])
    phash = rng.integers(0, 2**63, rows, dtype=np.int64).astype(np.uint64)
    copies = rng.choice(rows, int(rows * near_duplicate_share), replace=False)
    sources = rng.integers(0, rows, len(copies))
    flips = np.zeros(len(copies), dtype=np.uint64)
    for _ in range(3):
        flips ^= np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
    phash[copies] = phash[sources] ^ flips
    sizes = rng.choice([128, 224, 256, 512], rows)
    return pd.DataFrame(
        {
            "path": [f"{label}/img_{i:06d}.jpg" for i, label in enumerate(labels)],
            "file": [f"img_{i:06d}.jpg" for i in range(rows)],
            "label": labels,
            "sha256": [f"{i:064x}" for i in rng.permutation(rows)],
            "file_bytes": rng.integers(2_000, 200_000, rows),
            "format": "JPEG",
            "width": sizes,
            "height": sizes,
            "mode": rng.choice(["RGB", "L"], rows, p=[0.95, 0.05]),
            "source_mode": "RGB",
            "channels": 3,
            "brightness": rng.uniform(30, 220, rows),
            "contrast": rng.uniform(5, 80, rows),
            "sharpness": rng.gamma(2.0, 150.0, rows),
            "mean_r": rng.uniform(0, 255, rows),
            "mean_g": rng.uniform(0, 255, rows),
            "mean_b": rng.uniform(0, 255, rows),
            "phash": [f"{int(v):016x}" for v in phash],
            "mtime_ns": rng.integers(1_600_000_000, 1_700_000_000, rows) * 1_000_000_000,
            "site": rng.choice(["A", "B"], rows),
            "lighting": rng.choice(["warm", "cool", "daylight"], rows),
            "camera": rng.choice(["cam1", "cam2"], rows),
            "batch": [f"b{i % 500:03d}" for i in range(rows)],
        }
    )


def bench_params() -> Params:
    params = Params()
    params.validate.labels = LABELS
    params.validate.required_metadata = ["site", "lighting", "camera", "batch"]
    return params


Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def timed(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), value


def one_round(layout: Layout, manifest: pd.DataFrame, params: Params) -> dict[str, Timing]:
    vp = params.validate
    total, _ = timed(lambda: run_validate(params, layout))
    grouping, frame = timed(lambda: with_derived_columns(manifest, vp.near_duplicate_distance))
    classes = class_count_frame(frame["label"], LABELS)
    frames = [gxrun.Frame("manifest", frame, "path"), gxrun.Frame("classes", classes, "label")]
    gx_run, _ = timed(lambda: gxrun.run_checks(frames, manifest_checks(vp, LABELS, "bench")))
    return {"run_validate (end to end)": total, "near-dup grouping + derived columns": grouping, "GX suite run": gx_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    manifest = synthetic_manifest(args.rows)
    params = bench_params()
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        layout.data.mkdir(parents=True)
        manifest.to_parquet(layout.manifest, index=False)
        run_validate(params, layout)  # warm-up: first GX run pays one-off setup
        rounds = [one_round(layout, manifest, params) for _ in range(args.repeats)]

    print(f"GX data gate on a {args.rows}-row manifest, median of {args.repeats} (target < 5 s wall):")
    print(f"  {'':<38} {'wall':>7} {'cpu':>7}   (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for key in rounds[0]:
        wall = statistics.median(r[key][0] for r in rounds)
        cpu = statistics.median(r[key][1] for r in rounds)
        print(f"  {key:<38} {wall:6.2f}s {cpu:6.2f}s")


if __name__ == "__main__":
    main()
