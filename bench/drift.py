"""Drift report speed: `run_drift` on 10k current images (decode + stats + ONNX embeddings + Evidently + HTML),
against the embedding pass alone (ONNX Runtime on the same images, already decoded).

Needs a project with a trained + exported model and its drift reference, e.g. the one
bench/drift_calibration.py leaves with `--keep DIR` (DIR/demo). The current images are demo images
(new seed, sites A/B) rendered at the project's demo size.

Usage: .venv/bin/python bench/drift.py --project /tmp/lsm_cal/demo [--images 10000] [--image-size 128] [--max-window-images N]
Reports wall and process CPU seconds (the machine is shared: CPU seconds are the steadier figure).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.drift.current import decoded_chunks, list_window  # noqa: E402
from lensmith.drift.embeddings import EmbeddingModel  # noqa: E402
from lensmith.drift.reference import onnx_model_path  # noqa: E402
from lensmith.drift.report import run_drift  # noqa: E402
from lensmith.layout import Layout  # noqa: E402
from lensmith.params import params_from_dict  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decode pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-window-images", type=int, default=None,
                        help="override drift.max_window_images (default: the params default); e.g. 100000 = no sampling")
    args = parser.parse_args()
    layout = Layout(args.project.resolve())
    drift = {"model": "candidate"} | ({} if args.max_window_images is None else {"max_window_images": args.max_window_images})
    params = params_from_dict({"drift": drift})
    current = layout.root / f"bench_current_{args.images}"
    if not current.is_dir():
        from lensmith.demodata import generate_demo_dataset

        print(generate_demo_dataset(current, sites=None, seed=7, per_class=args.images // 5, image_size=args.image_size))

    # the embedding pass alone, on pre-decoded images
    model = EmbeddingModel(onnx_model_path(layout, layout.candidate), layout.cache_dir)
    listing = list_window(str(current), params, layout)
    images = np.concatenate([c.images for c in decoded_chunks(listing.items, params, model.preprocessing)])
    model.run_all(images[:256], params.drift.batch_size)  # warm-up
    wall, cpu = time.perf_counter(), cpu_seconds()
    model.run_all(images, params.drift.batch_size)
    embed_wall, embed_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    del images

    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run_drift(params, layout, str(current))
    total_wall, total_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    s = result.report["seconds"]
    cur = result.report["current"]
    print(f"window: {cur['n_in_window']} images ({args.image_size}px JPEG), measured on {cur['n_images']} "
          f"(drift.max_window_images {params.drift.max_window_images}); {len(result.report['columns'])} columns")
    print(f"embedding pass alone: {embed_wall:.1f}s wall, {embed_cpu:.1f}s CPU")
    print(f"drift report end to end: {total_wall:.1f}s wall, {total_cpu:.1f}s CPU "
          f"({total_wall / embed_wall:.1f}x the embedding pass) -- target <= 15 s")
    print(f"  breakdown (wall): decode+stats {s['decode']:.1f}s, embeddings {s['embedding']:.1f}s, "
          f"evidently {s['evidently']:.1f}s, html {s['html']:.1f}s")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
