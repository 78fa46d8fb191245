"""Service throughput: requests/s through POST /v1/predict with 16 concurrent clients vs the raw ONNX
Runtime session on the same images, plus p50/p99 latency and what the load generator itself cost.

    .venv/bin/python bench/serve.py [--model .cache/bench/inference/models/candidate] [--seconds 15] [--rounds 3]
        [--clients 16] [--client raw|httpx] [--max-batch N] [--serve KEY=VALUE ...]
        [--variant 'NAME [code=DIR] [serve.KEY=VALUE ...] [env.KEY=VALUE ...]' ...]

Starts `lensmith serve --model MODEL` as a real uvicorn process on a free 127.0.0.1 port (one per
--variant: e.g. the code before a change, `git archive HEAD~3 lensmith | tar -x -C /tmp/before` and
--variant 'before code=/tmp/before' --variant now) and, for `--rounds` rounds, measures each variant in
turn (order reversed every other round) by driving it for `--seconds` with `--clients` concurrent
keep-alive connections, one image per request, then the raw session in this process on the same JPEGs
at batch `--raw-batch` (16) while the servers idle:
  - session.run with ONNX Runtime's default threads (all cores), one run at a time;
  - one single-threaded session.run per core side by side (what a multi-core CPU does best);
  - decode + preprocess + session.run, one run at a time.
Ratios are against the better of the first two, per round; medians over the rounds are printed last.
Target: service req/s >= 0.75x the raw session's img/s.

The load generator shares the machine's cores with the server (2 here), so it is kept cheap: one asyncio
process writing pre-built HTTP/1.1 requests (multipart bodies built once) and reading only the status
line, headers and Content-Length bytes of each answer (`--client httpx` uses httpx instead, to compare).
Its CPU time per request is printed, and so is the server's (from /proc; the event loop's main thread
apart from the other threads), the share of the time a session run was going on (from the service's
/metrics), and the raw session's CPU per image, so the overhead of serving shows in CPU terms too, not
only as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.imageio import decode_image  # noqa: E402
from lensmith.onnxmodel import OnnxModel  # noqa: E402
from lensmith.params import Params  # noqa: E402
from lensmith.procutil import free_port  # noqa: E402
from lensmith.onnxmodel import onnx_file_for  # noqa: E402
from _http import multipart_predict_request  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def sample_images(model_dir: Path, n: int) -> list[bytes]:
    """Test-split JPEGs when the model's project has them, else demo-like JPEGs at 128 px."""
    root = model_dir.parents[1]
    split = root / "data" / "splits" / "test.parquet"
    if split.is_file():
        import pandas as pd

        from lensmith.shards import frame_image_refs, read_image_bytes

        return [read_image_bytes(ref) for ref in frame_image_refs(pd.read_parquet(split), root)[:n]]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """user + system CPU seconds of a process (all its threads), or of one of its threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15 of stat)


def raw_throughput(model: OnnxModel, single: OnnxModel, images: list[bytes], batch: int, seconds: float) -> dict[str, float]:
    """images/s (and CPU ms/image) of the raw session at `batch` on already preprocessed input, two ways:
    one run at a time with ONNX Runtime's default threads (all cores), and one single-threaded run per core
    side by side (`single`, run from that many threads); `best` is the higher. Also decode + preprocess +
    session.run, one run at a time."""
    chosen = [images[i % len(images)] for i in range(batch)]
    decoded = [decode_image(d).image for d in chosen]
    x = model.preprocessing.batch(decoded)

    def timed(fn, threads: int = 1) -> tuple[float, float]:  # noqa: ANN001
        fn()
        counts = [0] * threads
        start, cpu = time.perf_counter(), time.process_time()

        def loop(i: int) -> None:
            while counts[i] < 3 or time.perf_counter() - start < seconds:
                fn()
                counts[i] += 1

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(loop, range(threads)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        n = sum(counts) * batch
        return n / wall, cpu * 1000 / n

    session_only, session_cpu = timed(lambda: model.logits(x))
    parallel, parallel_cpu = timed(lambda: single.logits(x), os.cpu_count() or 1)
    end_to_end, end_to_end_cpu = timed(lambda: model.logits(model.preprocessing.batch([decode_image(d).image for d in chosen])))
    return {
        "session": session_only, "session_cpu_ms": session_cpu, "parallel": parallel, "parallel_cpu_ms": parallel_cpu,
        "best": max(session_only, parallel), "e2e": end_to_end, "e2e_cpu_ms": end_to_end_cpu,
    }


# ---- load generation -------------------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


async def drive_raw(host: str, port: int, images: list[bytes], clients: int, seconds: float) -> Load:
    """`clients` keep-alive connections, each sending pre-built requests back to back until the deadline."""
    requests = [multipart_predict_request(f"{host}:{port}", img) for img in images]
    load = Load()
    deadline = time.perf_counter() + seconds

    async def one_client(i: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        k = i
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(requests[k % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                load.latencies.append(time.perf_counter() - t0)
                if head[9:12] != b"200":
                    load.errors += 1
                    if b"connection: close" in head.lower():
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, port)
                k += clients
        finally:
            writer.close()

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return load


async def drive_httpx(url: str, images: list[bytes], clients: int, seconds: float) -> Load:
    load = Load()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one_client(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post("/v1/predict", files={"file": ("x.jpg", images[k % len(images)], "image/jpeg")})
                load.latencies.append(time.perf_counter() - t0)
                load.errors += r.status_code != 200
                k += clients

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return load


def drive(kind: str, url: str, images: list[bytes], clients: int, seconds: float) -> Load:
    if kind == "httpx":
        return asyncio.run(drive_httpx(url, images, clients, seconds))
    host, port = url.removeprefix("http://").split(":")
    return asyncio.run(drive_raw(host, int(port), images, clients, seconds))


# ---- the server ------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One service configuration to measure: its own code tree (`code=DIR`), serve.* params, environment."""

    name: str
    code: Path | None = None
    serve: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """'NAME [code=DIR] [serve.KEY=VALUE ...] [env.KEY=VALUE ...]'"""
        name, *parts = text.split()
        variant = cls(name)
        for part in parts:
            key, _, value = part.partition("=")
            if key == "code":
                variant.code = Path(value).resolve()
            elif key.startswith("serve."):
                variant.serve[key.removeprefix("serve.")] = yaml.safe_load(value)
            elif key.startswith("env."):
                variant.env[key.removeprefix("env.")] = value
            else:
                raise SystemExit(f"--variant {text!r}: {part!r} is not code=DIR, serve.KEY=VALUE or env.KEY=VALUE")
        return variant


def start_server(model: Path, serve: dict[str, object], root: Path, variant: Variant | None = None) -> tuple[subprocess.Popen, str]:
    """`lensmith serve` with params.yaml = {serve: `serve`} (other sections at their defaults, whatever the code's version)."""
    variant = variant or Variant("service")
    Params.model_validate({"serve": serve})  # fail here on a typo, not in the server's log
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({"serve": serve}))
    env = {**os.environ, **variant.env}
    if variant.code is not None:  # `python -m` puts the working directory first on sys.path
        env["PYTHONPATH"] = str(variant.code)
    process = subprocess.Popen(
        [sys.executable, "-m", "lensmith.cli", "serve", "--model", str(model), "--port", str(port), "--root", str(root), "--params", str(params_file)],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=variant.code,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        if process.poll() is not None:
            raise SystemExit(f"server exited; see {root / 'server.log'}:\n{(root / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not start; see {root / 'server.log'}")


def batch_totals(url: str) -> tuple[float, float, float]:
    """(images, session runs, seconds in session runs) so far, from the service's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = dict(re.findall(r"^(lensmith_batch_size_sum|lensmith_batch_size_count|lensmith_inference_seconds_sum) (\S+)$", text, re.MULTILINE))
    return tuple(float(values.get(k, "nan")) for k in ("lensmith_batch_size_sum", "lensmith_batch_size_count", "lensmith_inference_seconds_sum"))


def measure(variant: Variant, process: subprocess.Popen, url: str, args: argparse.Namespace, images: list[bytes]) -> dict[str, float]:
    before, server0, client0 = batch_totals(url), process_cpu_s(process.pid), time.process_time()
    loop0 = process_cpu_s(process.pid, thread=process.pid)  # the main thread runs the event loop
    start = time.perf_counter()
    load = drive(args.client, url, images, args.clients, args.seconds)
    wall = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client0, process_cpu_s(process.pid) - server0
    loop_cpu = process_cpu_s(process.pid, thread=process.pid) - loop0
    after = batch_totals(url)
    n = len(load.latencies)
    lat = np.asarray(load.latencies) * 1000
    return {
        "rps": n / wall, "n": n, "errors": load.errors, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
        "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
        "busy": (after[2] - before[2]) / wall,  # share of the time a session run was going on (> 1: runs overlapped)
        "client_ms": client_cpu * 1000 / max(n, 1), "client_share": client_cpu / wall,
        "server_ms": server_cpu * 1000 / max(n, 1), "server_share": server_cpu / wall,
        "loop_ms": loop_cpu * 1000 / max(n, 1),  # the rest: inference runners, log writer, thread pool
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(".cache/bench/inference/models/candidate"))
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of each service measurement")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (each service variant, raw session); medians are reported")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="Load generator (raw: pre-built requests on asyncio streams)")
    parser.add_argument("--max-batch", type=int, default=None, help="serve.max_batch_size (default: the params default)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="serve.max_wait_ms (default: the params default)")
    parser.add_argument("--raw-batch", type=int, default=16, help="Batch of the raw session baseline (single-threaded runs cost about the same per image at any batch)")
    parser.add_argument("--serve", action="append", default=[], metavar="KEY=VALUE", help="Any other serve.* parameter, e.g. threads=1")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="'NAME [code=DIR] [serve.K=V] [env.K=V]'",
        help="Measure several service configurations in the same rotation (e.g. the code before a change: "
        "`git archive HEAD~1 lensmith | tar -x -C /tmp/before` then --variant 'before code=/tmp/before' --variant now)",
    )
    args = parser.parse_args()
    model_dir = args.model.resolve()
    if not model_dir.exists():
        raise SystemExit(f"{model_dir} does not exist; run bench/inference.py first (or pass --model)")

    serve: dict[str, object] = {"review_threshold": 0.0}  # every prediction logged, none copied to the review queue
    if args.max_batch is not None:
        serve["max_batch_size"] = args.max_batch
    if args.max_wait_ms is not None:
        serve["max_wait_ms"] = args.max_wait_ms
    for item in args.serve:
        key, _, value = item.partition("=")
        serve[key.removeprefix("serve.")] = yaml.safe_load(value)
    variants = [Variant.parse(v) for v in args.variant] or [Variant("service")]
    raw_batch = args.raw_batch
    images = sample_images(model_dir, 64)
    path, model_variant = onnx_file_for(model_dir, "auto", ["CPUExecutionProvider"])
    raw_model = OnnxModel.load(path)
    raw_single = OnnxModel.load(path, threads=1)
    print(f"model {path.name} ({model_variant}), {raw_model.preprocessing.image_size}px, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"serve params: {serve}; load generator: {args.client}, {args.clients} connections; raw baseline at batch {raw_batch}")
    results: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    raws: list[dict[str, float]] = []
    servers: list[tuple[Variant, subprocess.Popen, str]] = []
    with tempfile.TemporaryDirectory(prefix="lensmith-bench-serve-") as tmp:
        try:
            for v in variants:
                process, url = start_server(model_dir, {**serve, **v.serve}, Path(tmp) / v.name, v)
                servers.append((v, process, url))
                print(f"variant {v.name}: code {v.code or 'this checkout'}, serve {v.serve or '-'}, env {v.env or '-'}", flush=True)
                drive(args.client, url, images, args.clients, 2.0)  # warm-up
            for r in range(args.rounds):
                order = servers if r % 2 == 0 else servers[::-1]
                for v, process, url in order:
                    row = measure(v, process, url, args, images)
                    results[v.name].append(row)
                    print(
                        f"round {r + 1} {v.name}: {row['rps']:.1f} req/s ({row['n']} requests, {row['errors']} errors, "
                        f"mean batch {row['mean_batch']:.1f}, session busy {row['busy']:.2f}), p50 {row['p50']:.0f} ms, p99 {row['p99']:.0f} ms; "
                        f"CPU per request: server {row['server_ms']:.1f} ms ({row['server_share']:.2f} cores; event loop {row['loop_ms']:.2f} ms), "
                        f"load generator {row['client_ms']:.2f} ms ({row['client_share']:.2f} cores)",
                        flush=True,
                    )
                raw = raw_throughput(raw_model, raw_single, images, raw_batch, min(args.seconds, 6.0))
                raws.append(raw)
                for v in variants:
                    results[v.name][-1]["ratio"] = results[v.name][-1]["rps"] / raw["best"]
                    results[v.name][-1]["ratio_e2e"] = results[v.name][-1]["rps"] / raw["e2e"]
                print(
                    f"round {r + 1} raw: session.run {raw['session']:.1f} img/s ({raw['session_cpu_ms']:.1f} CPU ms/img), "
                    f"{os.cpu_count()} single-threaded runs side by side {raw['parallel']:.1f} img/s ({raw['parallel_cpu_ms']:.1f} CPU ms/img), "
                    f"decode+preprocess+run {raw['e2e']:.1f} img/s; service/best raw "
                    + ", ".join(f"{v.name} {results[v.name][-1]['ratio']:.2f}x" for v in variants),
                    flush=True,
                )
        finally:
            for _, process, _ in servers:
                process.send_signal(signal.SIGINT)
            for _, process, _ in servers:
                process.wait(timeout=60)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return float(np.median([row[key] for row in rows]))

    print(f"--- medians of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f} after")
    print(f"raw session.run at batch {raw_batch}: {med(raws, 'session'):.1f} img/s ({med(raws, 'session_cpu_ms'):.1f} CPU ms per image); "
          f"{os.cpu_count()} single-threaded runs side by side {med(raws, 'parallel'):.1f} img/s ({med(raws, 'parallel_cpu_ms'):.1f} CPU ms per image); "
          f"decode+preprocess+run {med(raws, 'e2e'):.1f} img/s")
    for v in variants:
        rows = results[v.name]
        print(
            f"{v.name}: {med(rows, 'rps'):.1f} req/s with {args.clients} clients, {sum(r['errors'] for r in rows)} errors; "
            f"latency p50 {med(rows, 'p50'):.1f} ms, p99 {med(rows, 'p99'):.1f} ms; mean batch {med(rows, 'mean_batch'):.1f}, "
            f"session busy {med(rows, 'busy'):.2f}; CPU per request: server {med(rows, 'server_ms'):.1f} ms "
            f"(event loop {med(rows, 'loop_ms'):.2f} ms, other threads {med(rows, 'server_ms') - med(rows, 'loop_ms'):.1f} ms), "
            f"load generator {med(rows, 'client_ms'):.2f} ms ({med(rows, 'client_share'):.2f} of a core) "
            f"-> service/raw {med(rows, 'ratio'):.2f}x of the better raw figure (target >= 0.75x), {med(rows, 'ratio_e2e'):.2f}x of decode+preprocess+run"
        )


if __name__ == "__main__":
    main()
