"""Ingest throughput: `run_ingest` (process pool) vs a single-process plain-Pillow loop computing the same columns.

    .venv/bin/python bench/ingest.py [--images 5000] [--rounds 3] [--workers 0]

Both sides are measured in one run, rotating A/B (the machine is shared and noisy), each ingest from scratch
(fresh project dir: no incremental reuse). Prints the median images/s of each and their ratio (target >= 1.8x
on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.imagestats import image_stats, perceptual_hash  # noqa: E402
from lensmith.ingest import run_ingest  # noqa: E402
from lensmith.layout import Layout  # noqa: E402
from lensmith.params import Params  # noqa: E402

CLASSES = ("ok", "crack", "scratch", "stain", "pitting")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def generate_images(out: Path, n_images: int, image_size: int = 128) -> str:
    """The demo tile set when the generator is available, else simple seeded JPEG textures; returns which."""
    try:
        from lensmith.demodata import generate_demo_dataset
    except ImportError:
        generate_demo_dataset = None
    if generate_demo_dataset is not None:
        generate_demo_dataset(out, sites=None, seed=0, per_class=max(1, n_images // len(CLASSES)), image_size=image_size)
        return "lensmith.demodata"
    rng = np.random.default_rng(0)
    for i in range(n_images):
        label = CLASSES[i % len(CLASSES)]
        (out / label).mkdir(parents=True, exist_ok=True)
        base = rng.normal(128, 30, (image_size // 8, image_size // 8, 3)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(base).resize((image_size, image_size), Image.Resampling.BICUBIC)
        img.save(out / label / f"{label}_{i:05d}.jpg", quality=90)
    return "simple seeded textures"


def plain_pillow_rows(root: Path) -> list[dict[str, object]]:
    """The baseline: one process, plain Pillow, the same per-image columns as the manifest."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        fmt, source_mode = img.format, img.mode
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        rows.append(
            {
                "path": path.relative_to(root).as_posix(),
                "label": path.parent.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "file_bytes": len(data),
                "format": fmt,
                "width": img.width,
                "height": img.height,
                "mode": img.mode,
                "source_mode": source_mode,
                "channels": len(img.getbands()),
                **image_stats(img),
                "phash": perceptual_hash(img),
            }
        )
    return rows


def cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (the pool workers, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_baseline(root: Path) -> tuple[float, float, int]:
    start, cpu = time.perf_counter(), cpu_seconds()
    n = len(plain_pillow_rows(root))
    return time.perf_counter() - start, cpu_seconds() - cpu, n


def time_ingest(root: Path, workdir: Path, workers: int, round_no: int) -> tuple[float, float, int]:
    params = Params()
    params.data.source = str(root)
    params.data.workers = workers
    layout = Layout(workdir / f"project-{workers}-{round_no}")  # fresh: nothing to reuse
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = run_ingest(params, layout)
    seconds = time.perf_counter() - start
    assert summary.n_reused == 0
    return seconds, cpu_seconds() - cpu, summary.n_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="run_ingest workers (0 = one per core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lensmith-bench-") as tmp:
        workdir = Path(tmp)
        root = workdir / "raw"
        start = time.perf_counter()
        origin = generate_images(root, args.images)
        n_files = sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        print(f"{n_files} images ({origin}) generated in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} cores, run_ingest workers={args.workers or os.cpu_count()}")

        names = ("plain Pillow, 1 process", "run_ingest")
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu_ms: dict[str, list[float]] = {name: [] for name in names}
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        for round_no in range(args.rounds):
            for name, measure in zip(names, (lambda: time_baseline(root),
                                             lambda: time_ingest(root, workdir, args.workers, round_no))):
                seconds, cpu, n = measure()
                rates[name].append(n / seconds)
                cpu_ms[name].append(1000 * cpu / n)
            print(f"  round {round_no + 1}: plain {rates[names[0]][-1]:.0f} img/s, run_ingest {rates[names[1]][-1]:.0f} img/s")
        print(f"load average after: {os.getloadavg()[0]:.1f} (above {os.cpu_count()} the cores were shared)")

    medians = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_ms.items()}
    for name in names:
        print(f"{name:>24}: {medians[name]:7.0f} images/s, {cpu[name]:.2f} CPU-ms/image (medians of {args.rounds})")
    ratio = medians["run_ingest"] / medians["plain Pillow, 1 process"]
    print(f"{'speed-up':>24}: {ratio:7.2f}x wall clock (target >= 1.8x on 2 cores)")
    # On an idle machine the pool's wall time is its CPU time spread over the workers.
    workers = args.workers or os.cpu_count() or 1
    ceiling = workers * cpu["plain Pillow, 1 process"] / cpu["run_ingest"]
    print(f"{'CPU-bound ceiling':>24}: {ceiling:7.2f}x ({workers} workers x CPU cost ratio; reached only on idle cores)")


if __name__ == "__main__":
    main()
