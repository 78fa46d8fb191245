"""Service throughput: requests/s through POST /v1/predict with 16 concurrent clients vs the raw ONNX
Runtime session on the same images, plus p50/p99 latency.

    .venv/bin/python bench/serve.py [--model .cache/bench/inference/models/candidate] [--seconds 15] [--clients 16]

Starts `lensmith serve --model MODEL` as a real uvicorn process on a free 127.0.0.1 port and drives it
from one asyncio process (16 concurrent keep-alive clients, one image per request) for `--seconds`.
The raw figure is measured in this process on the same JPEGs at the service's max batch size, twice:
session.run only (on already preprocessed input), and decode + preprocess + session.run (what the service
must also do per request). Target: service req/s >= 0.75x the raw session's images/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.imageio import decode_image  # noqa: E402
from lensmith.params import Params  # noqa: E402
from lensmith.serve.models import onnx_file_for  # noqa: E402
from lensmith.onnxmodel import OnnxModel  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(model_dir: Path, n: int) -> list[bytes]:
    """Test-split JPEGs when the model's project has them, else demo-like JPEGs at 128 px."""
    root = model_dir.parents[1]
    split = root / "data" / "splits" / "test.parquet"
    if split.is_file():
        import pandas as pd

        files = [Path(f) if Path(f).is_absolute() else root / f for f in pd.read_parquet(split)["file"]]
        return [f.read_bytes() for f in files[:n]]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def raw_throughput(model: OnnxModel, images: list[bytes], batch: int, seconds: float) -> tuple[float, float]:
    """(images/s of session.run alone, images/s of decode + preprocess + session.run) at `batch`."""
    chosen = [images[i % len(images)] for i in range(batch)]
    decoded = [decode_image(d).image for d in chosen]
    x = model.preprocessing.batch(decoded)

    def timed(fn) -> float:  # noqa: ANN001
        fn()
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * batch / (time.perf_counter() - start)

    session_only = timed(lambda: model.logits(x))
    end_to_end = timed(lambda: model.logits(model.preprocessing.batch([decode_image(d).image for d in chosen])))
    return session_only, end_to_end


async def drive(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", files={"file": ("x.jpg", images[k % len(images)], "image/jpeg")})
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200
                k += clients

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return len(latencies), errors, latencies


def start_server(model: Path, params: Params, root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    process = subprocess.Popen(
        [sys.executable, "-m", "lensmith.cli", "serve", "--model", str(model), "--port", str(port), "--root", str(root), "--params", str(params_file)],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not start; see {root / 'server.log'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(".cache/bench/inference/models/candidate"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=4.0)
    args = parser.parse_args()
    model_dir = args.model.resolve()
    if not model_dir.exists():
        raise SystemExit(f"{model_dir} does not exist; run bench/inference.py first (or pass --model)")

    params = Params.model_validate({"serve": {"max_batch_size": args.max_batch, "max_wait_ms": args.max_wait_ms, "review_threshold": 0.0}})
    images = sample_images(model_dir, 64)
    path, variant = onnx_file_for(model_dir, "auto", ["CPUExecutionProvider"])
    raw_model = OnnxModel.load(path)
    with tempfile.TemporaryDirectory(prefix="lensmith-bench-serve-") as tmp:
        process, url = start_server(model_dir, params, Path(tmp))
        try:
            asyncio.run(drive(url, images, args.clients, 2.0))  # warm-up
            n, errors, latencies = asyncio.run(drive(url, images, args.clients, args.seconds))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        # raw after the server is gone, so both sides had the machine to themselves
        session_only, end_to_end = raw_throughput(raw_model, images, args.max_batch, min(args.seconds, 8.0))
    rps = n / args.seconds
    lat = np.asarray(latencies) * 1000
    print(f"model {path.name} ({variant}), {raw_model.preprocessing.image_size}px, {os.cpu_count()} cores")
    print(f"service: {rps:.1f} req/s with {args.clients} clients, {errors} errors; latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
    print(f"raw session.run at batch {args.max_batch}: {session_only:.1f} img/s -> service/raw {rps / session_only:.2f}x (target >= 0.75x)")
    print(f"raw decode+preprocess+run at batch {args.max_batch}: {end_to_end:.1f} img/s -> service/raw {rps / end_to_end:.2f}x")


if __name__ == "__main__":
    main()
