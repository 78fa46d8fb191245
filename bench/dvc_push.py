"""`dvc push` of many small images to a real S3 server (SeaweedFS on 127.0.0.1): is it slow?

A: 10,000 small JPEGs (ImageFolder, <label>/<file>) tracked as one DVC directory (one S3 object per image);
B: the same images packed by `lensmith.packing.pack_images` (what `lensmith pack` writes: tar shards of
   1,000 images + shard-index.parquet) tracked as one DVC directory; ingest reads images inside them.
Both pushed to fresh prefixes of the same server in the same run, rotating A/B; medians reported.

    .venv/bin/python bench/dvc_push.py [--images 10000] [--rounds 2] [--jobs 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lensmith.packing import pack_images  # noqa: E402
from lensmith.testing.project import tool_env  # noqa: E402
from lensmith.testing.s3server import start_s3_server, stop_s3_server  # noqa: E402

LABELS = ("crack", "ok", "scratch", "stain")


def write_images(out: Path, n: int) -> None:
    """`n` small JPEGs in an ImageFolder tree (<label>/<file>)."""
    rng = np.random.default_rng(0)
    for label in LABELS:
        (out / label).mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(out / LABELS[i % len(LABELS)] / f"{i:05d}.jpg", quality=80)


def dvc_project(root: Path, data: Path, endpoint: str, bucket: str, prefix: str, env: dict[str, str]) -> Path:
    root.mkdir()
    shutil.copytree(data, root / "data")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "remote", "add", "-d", "s3", f"s3://{bucket}/{prefix}"],
                [sys.executable, "-m", "dvc", "remote", "modify", "s3", "endpointurl", endpoint],
                [sys.executable, "-m", "dvc", "add", "data"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


def timed_push(root: Path, env: dict[str, str], jobs: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "push", "-j", str(jobs)], cwd=root, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lensmith-bench-push-"))
    server = start_s3_server()
    try:
        env = tool_env(server.env)
        write_images(base / "images", args.images)
        packed = pack_images(base / "images", base / "shards", extensions=[".jpg"], shard_images=args.per_shard)
        print(packed, flush=True)
        size = sum(p.stat().st_size for p in (base / "images").rglob("*.jpg"))
        bucket = server.make_bucket("bench")
        times: dict[str, list[float]] = {"files": [], "shards": []}
        for r in range(args.rounds):
            for kind in (("files", "shards") if r % 2 == 0 else ("shards", "files")):
                src = base / ("images" if kind == "files" else "shards")
                root = dvc_project(base / f"{kind}{r}", src, server.endpoint_url, bucket, f"{kind}{r}", env)
                seconds = timed_push(root, env, args.jobs)
                times[kind].append(seconds)
                print(f"round {r + 1} {kind:<6}: {seconds:6.1f} s", flush=True)
        a, b = statistics.median(times["files"]), statistics.median(times["shards"])
        print(f"\ndvc push of {args.images} images ({size / 1e6:.1f} MB), -j {args.jobs}, medians of {args.rounds}:")
        print(f"  one object per image: {a:.1f} s ({args.images / a:.0f} files/s)")
        print(f"  lensmith pack, shards of {args.per_shard}: {b:.1f} s -> shards are {a / b:.1f}x faster "
              f"(packing took {packed.seconds:.1f} s, once)")
    finally:
        stop_s3_server(server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
