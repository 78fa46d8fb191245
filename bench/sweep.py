"""Sweep of 4 configurations: Dask (local cluster, 2 worker processes) vs sequential (thread runner, 1 worker).

    .venv/bin/python bench/sweep.py [--per-class 16] [--epochs 1] [--workdir .cache/bench-sweep]

Builds a small project (demo data -> ingest -> validate -> split, in-process), then runs flows/sweep.py's
sweep_flow twice on it, sequential first (it also builds the shared image cache), and prints wall times,
the speed-up and whether both runners gave identical weights. Each task pins torch to one thread.
On 2 cores expect < 2x: both workers compete with the flow process and its Prefect server.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [{"train.lr": 0.001}, {"train.lr": 0.003}, {"train.lr": 0.001, "train.label_smoothing": 0.0}, {"train.lr": 0.003, "train.weight_decay": 0.01}]


def build_project(root: Path, per_class: int, epochs: int) -> Path:
    from lensmith.layout import Layout
    from lensmith.params import apply_overrides, params_from_dict, read_params_yaml
    from lensmith.stages import run_stage

    repo = Path(__file__).resolve().parents[1]
    overrides = [
        f"demo.per_class={per_class}", "demo.image_size=64", "validate.min_images_per_class=5", "split.min_class_size=5",
        "split.group_column=null", "train.model=mobilenet_v3_small", "train.pretrained=false", "train.image_size=64",
        f"train.epochs={epochs}", "train.freeze_epochs=0", "train.batch_size=16", "evaluate.robustness.perturbations=[]",
        "evaluate.worst_examples=0",
    ]
    root.mkdir(parents=True, exist_ok=True)
    raw = apply_overrides(read_params_yaml(repo / "params.yaml"), overrides)
    params = params_from_dict(raw, "bench params")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if not Layout(root).split_file("test").is_file():
        for stage in ("demo_data", "ingest", "validate", "split"):
            run_stage(stage, params, Layout(root))
    return root


def timed_sweep(root: Path, overrides: list[str]) -> tuple[float, list[dict]]:
    from flows.sweep import sweep_flow

    start = time.perf_counter()
    results = sweep_flow(str(root), configs=CONFIGS, overrides=overrides)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench-sweep"))
    args = parser.parse_args()
    root = build_project(args.workdir.resolve(), args.per_class, args.epochs)
    seq_s, seq = timed_sweep(root, ["orchestration.task_runner=thread", "orchestration.thread_max_workers=1"])
    dask_s, dsk = timed_sweep(root, ["orchestration.task_runner=dask", "orchestration.dask_n_workers=2"])
    same = [a["weights_sha256"] == b["weights_sha256"] for a, b in zip(seq, dsk, strict=True)]
    print(f"\nsweep of {len(CONFIGS)} configurations ({args.per_class}/class, {args.epochs} epoch(s), mobilenet_v3_small, 64 px)")
    print(f"  sequential (thread runner, 1 worker): {seq_s:6.1f} s   task seconds {[r['seconds'] for r in seq]}")
    print(f"  dask (local cluster, 2 processes):    {dask_s:6.1f} s   task seconds {[r['seconds'] for r in dsk]}")
    print(f"  speed-up: {seq_s / dask_s:.2f}x   identical weights per config: {all(same)}")


if __name__ == "__main__":
    main()
