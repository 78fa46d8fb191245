"""The service under hostile uploads, overload and a long soak, in one run against `lensmith serve` started
as a subprocess on a free 127.0.0.1 port (nothing else is contacted).

    .venv/bin/python bench/serve_load.py [--root PROJECT | --model MODEL_DIR] [--soak 50000] [--overload-s 60]
        [--clients 3] [--bombs 16] [--serve KEY=VALUE ...] [--out reports/bench/serve_load.json]

Without --root/--model it builds a small project like the serving tests do (lensmith.testing.servekit: demo
images, an untrained model, the real export; by default EfficientNet-Lite0 at 224 px, the project's default
backbone, so that inference, not HTTP, is what a request mostly costs, as in production) in a temporary folder; --root serves that
project's registry production model, --model a model folder (the prediction log goes to a temporary
folder either way). Every phase is bounded in count and time.

(a) hostile uploads: `--clients` clients each send `--bombs` palette PNGs at once, each in its own request
    (clients x bombs requests in flight): first 6000x6666 px (40 MP, ~50 KB each: over serve.max_pixels,
    refused from the header; every answer must be 4xx or 200), then 4000x6000 px (24 MP, just under the
    limit: decoded, reduced; more requests than serve.max_queue admits, so 503 with Retry-After is allowed
    too). The service's peak RSS (sampled every 5 ms, and the kernel's high-water mark VmHWM) must stay
    <= 1.5 GiB, and a normal request must still get 200 after.
(b) overload: unloaded latency (one client, one request at a time), capacity (16 keep-alive clients back
    to back), then `--overload-s` of open-loop arrivals at 4x that capacity or at `--rate` (a new request every 1/rate s
    whatever the answers; connections opened as needed up to `--max-conns`). Targets: no answer other
    than 200 or 503, p99 of the 200s <= 3x the unloaded p99, RSS back within 50 MB of before after 5 s.
(c) soak: `--soak` normal requests (16 clients, small JPEGs and PNGs), RSS after a warm-up of
    serve.feedback_window requests (they fill the memory of recent predictions kept for feedback, bounded
    in count and bytes) and at the end: growth <= 50 MB, no errors.

The load generator is one asyncio process writing pre-built HTTP/1.1 requests and reading the status,
headers and Content-Length bytes of each answer (cheap: it shares the machine's cores with the server).
Prints a table and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.layout import Layout  # noqa: E402
from lensmith.params import Params  # noqa: E402
from lensmith.procutil import free_port  # noqa: E402
from _http import multipart_predict_request  # noqa: E402

HOST = "127.0.0.1"
GIB = 1024**3
MB = 1024**2
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
CONTENT_TYPE = re.compile(rb"\r\ncontent-type:\s*([^\r\n;]+)", re.IGNORECASE)
try:
    import psutil
except ImportError:  # /proc is enough on Linux
    psutil = None


# ---- the service's memory ---------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    if psutil is not None:
        return int(psutil.Process(pid).memory_info().rss)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """user + system CPU seconds of a process (all its threads), or of one thread, from /proc."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def high_water_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident set since it started (the kernel's own figure)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The highest RSS of `pid` seen while the `with` block runs (sampled every `interval_s`)."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, ValueError):
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- requests ---------------------------------------------------------------------------------------------


def encoded(img, fmt: str) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def palette_png(width: int, height: int, seed: int) -> bytes:
    """A palette PNG of a few flat bands: tens of KB on the wire, width x height pixels decoded."""
    from PIL import Image, ImageDraw

    img = Image.new("P", (width, height), 0)
    img.putpalette([(i * 37 + seed * 11) % 256 for i in range(768)])
    draw = ImageDraw.Draw(img)
    for k in range(8):
        draw.rectangle((0, k * height // 8, width, (k + 1) * height // 8), fill=(k + seed) % 256)
    return encoded(img, "PNG")


def normal_images(n: int = 16) -> list[tuple[bytes, str]]:
    """JPEGs and PNGs like the service's everyday input: most 48-200 px, one in four 480x360 (decoded in the
    thread pool)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = (480, 360) if i % 4 == 3 else (int(rng.integers(48, 200)), int(rng.integers(48, 200)))
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * (1 + i % 5) + yy * (2 + i % 3)) % 256
        pixels = np.clip(np.stack([base, base * 0.7, base * 0.4], -1) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        fmt = "JPEG" if i % 3 else "PNG"
        out.append((encoded(Image.fromarray(pixels, "RGB"), fmt), f"image/{fmt.lower()}"))
    return out


def pixels(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.width * img.height


@dataclass
class Answer:
    status: int  # 0: no answer (connection closed or reset, or our timeout)
    seconds: float
    json_body: bool = False
    retry_after: bool = False
    index: int = -1  # which of the requests (open loop)
    sent_at: float = 0.0  # seconds after the open loop started


class Connection:
    """One keep-alive connection; reopened after the server closed it. Like any HTTP client, a request
    that finds a reused connection closed by the server (its keep-alive timeout) before any answer byte is
    sent again once on a new connection."""

    retried = 0  # requests sent again after a stale keep-alive connection (all connections together)

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes, timeout_s: float = 60.0) -> Answer:
        start = time.perf_counter()
        for attempt in (1, 2):
            reused = self.writer is not None
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                assert self.reader is not None
                self.writer.write(raw)
                head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout_s)
                length = CONTENT_LENGTH.search(head)
                await asyncio.wait_for(self.reader.readexactly(int(length.group(1)) if length else 0), timeout_s)
                break
            except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                self.close()
                stale = reused and attempt == 1 and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial)
                if not stale:
                    return Answer(0, time.perf_counter() - start)
                Connection.retried += 1
            except (OSError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                self.close()
                return Answer(0, time.perf_counter() - start)
        lower = head.lower()
        if b"\r\nconnection: close" in lower:
            self.close()
        kind = CONTENT_TYPE.search(head)
        return Answer(
            int(head[9:12]), time.perf_counter() - start,
            json_body=bool(kind) and kind.group(1).strip().lower() == b"application/json",
            retry_after=b"\r\nretry-after:" in lower,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(port: int, requests: list[bytes], clients: int, *, seconds: float | None = None, count: int | None = None) -> list[Answer]:
    """`clients` connections sending back to back until `seconds` pass or `count` requests were sent."""
    answers: list[Answer] = []
    deadline = time.perf_counter() + seconds if seconds is not None else float("inf")
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        connection = Connection(port)
        try:
            while time.perf_counter() < deadline and (count is None or sent < count):
                raw = requests[sent % len(requests)]
                sent += 1
                answers.append(await connection.send(raw))
        finally:
            connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return answers


async def burst(port: int, requests: list[bytes]) -> list[Answer]:
    """Every request at once, each on its own connection."""

    async def one(raw: bytes) -> Answer:
        connection = Connection(port)
        try:
            return await connection.send(raw, timeout_s=120.0)
        finally:
            connection.close()

    return list(await asyncio.gather(*(one(raw) for raw in requests)))


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float, max_conns: int) -> tuple[list[Answer], dict[str, float]]:
    """A request every 1/rate s for `seconds`, whatever the answers (an idle connection, else a new one up
    to `max_conns`, else the request waits for one: counted as late)."""
    answers: list[Answer] = []
    idle: list[Connection] = []
    opened = 0
    freed = asyncio.Condition()
    late = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int) -> None:
        nonlocal opened
        async with freed:
            while not idle and opened >= max_conns:
                await freed.wait()
            if idle:
                connection = idle.pop()
            else:
                connection = Connection(port)
                opened += 1
        sent_at = time.perf_counter() - start
        answer = await connection.send(requests[index], timeout_s=30.0)
        answer.index, answer.sent_at = index, sent_at
        answers.append(answer)
        async with freed:
            idle.append(connection)
            freed.notify()

    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.01:
            late += 1
        task = asyncio.create_task(one(i % len(requests)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    elapsed = time.perf_counter() - start
    return answers, {"offered": n, "offered_rate": n / sent_s, "late_sends": late, "connections": opened, "elapsed_s": elapsed}


def scrape(port: int) -> dict[str, float]:
    """The service's unlabelled /metrics samples (name -> value)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and ("{" not in name or name.startswith(("lensmith_queue_wait_seconds_bucket", "lensmith_gc_pause_seconds"))):
            values[name] = float(value)
    return values


def bucket_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float:
    """The upper bound (ms) of the histogram bucket holding quantile q of the observations between two scrapes."""
    prefix = name + '_bucket{le="'
    bounds = sorted((float(k[len(prefix):-2]), after[k] - before.get(k, 0.0)) for k in after if k.startswith(prefix))
    total = bounds[-1][1] if bounds else 0.0
    for bound, count in bounds:
        if total and count >= q * total:
            return 1000 * bound
    return float("nan")


def runs_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Session runs between two scrapes: how many, their mean seconds and images (what an accepted request's
    own run costs under that load), and admission's budget and seconds per image at the end."""
    runs = after["lensmith_inference_seconds_count"] - before["lensmith_inference_seconds_count"]
    seconds = after["lensmith_inference_seconds_sum"] - before["lensmith_inference_seconds_sum"]
    images = after["lensmith_batch_size_sum"] - before["lensmith_batch_size_sum"]
    waits = after.get("lensmith_queue_wait_seconds_count", 0.0) - before.get("lensmith_queue_wait_seconds_count", 0.0)
    wait_s = after.get("lensmith_queue_wait_seconds_sum", 0.0) - before.get("lensmith_queue_wait_seconds_sum", 0.0)
    return {
        "runs": runs, "mean_run_ms": 1000 * seconds / max(runs, 1), "mean_batch_images": images / max(runs, 1),
        "mean_queue_wait_ms": 1000 * wait_s / waits if waits else float("nan"),
        "queue_wait_p99_bucket_ms": bucket_quantile(before, after, "lensmith_queue_wait_seconds", 0.99),
        "budget_ms": 1000 * after.get("lensmith_admission_budget_seconds", float("nan")),
        "seconds_per_image_ms": 1000 * after.get("lensmith_inference_seconds_per_image", float("nan")),
        "gc": gc_pauses_between(before, after),
    }


def gc_pauses_between(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per generation: garbage collections between two scrapes, their total ms, and the bucket bound (ms) holding the longest."""
    found: dict[str, dict[str, float]] = {}
    for generation in ("0", "1", "2"):
        label = f'generation="{generation}"'
        count = after.get(f"lensmith_gc_pause_seconds_count{{{label}}}", 0.0) - before.get(f"lensmith_gc_pause_seconds_count{{{label}}}", 0.0)
        total = after.get(f"lensmith_gc_pause_seconds_sum{{{label}}}", 0.0) - before.get(f"lensmith_gc_pause_seconds_sum{{{label}}}", 0.0)
        prefix = f'lensmith_gc_pause_seconds_bucket{{generation="{generation}",le="'
        bounds = sorted((float(k[len(prefix):-2]), after[k] - before.get(k, 0.0)) for k in after if k.startswith(prefix))
        longest = next((1000 * bound for bound, n in bounds if n >= count), float("nan")) if count else 0.0
        found[generation] = {"collections": count, "total_ms": 1000 * total, "longest_le_ms": longest}
    return found


def p(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, q)) if latencies else float("nan")


def statuses(answers: list[Answer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in answers:
        counts[str(a.status)] = counts.get(str(a.status), 0) + 1
    return dict(sorted(counts.items()))


# ---- the server ------------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, work: Path, serve: dict[str, object]) -> tuple[subprocess.Popen, int]:
    Params.model_validate({"serve": serve})  # a typo fails here, not in the server's log
    port = free_port()
    params_file = work / "serve_load_params.yaml"
    params_file.write_text(yaml.safe_dump({"serve": serve}))
    if args.root:  # the project's production model; the prediction log goes to the temporary folder, not the project
        from lensmith.registry import Registry

        model = Registry(Layout(args.root.resolve()).models).resolve("production")
    else:
        model = args.model.resolve() if args.model else Layout(work).exported
    command = [
        sys.executable, "-m", "lensmith.cli", "serve", "--host", HOST, "--port", str(port), "--root", str(work),
        "--params", str(params_file), "--model", str(model),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {work / 'server.log'}:\n{(work / 'server.log').read_text()[-2000:]}")
        try:
            answer = asyncio.run(Connection(port).send(f"GET /v1/ready HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(), 2.0))
            if answer.status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not become ready; see {work / 'server.log'}")


# ---- phases ----------------------------------------------------------------------------------------------


def hostile(args: argparse.Namespace, pid: int, port: int, check: bytes) -> dict[str, object]:
    sets = {}
    for name, (w, h) in {"over the limit (6000x6666)": (6000, 6666), "under the limit (4000x6000)": (4000, 6000)}.items():
        bombs = [multipart_predict_request(HOST, palette_png(w, h, seed), "image/png", "x") for seed in range(args.bombs)]
        requests = [bombs[i % len(bombs)] for i in range(args.clients * args.bombs)]
        rss_before = rss_bytes(pid)
        start = time.perf_counter()
        with PeakSampler(pid) as sampler:
            answers = asyncio.run(burst(port, requests))
        after = asyncio.run(Connection(port).send(check))
        shed = [a for a in answers if a.status == 503]
        sets[name] = {
            "requests": len(answers), "png_bytes": len(bombs[0]), "statuses": statuses(answers),
            "seconds": time.perf_counter() - start, "rss_before_mb": rss_before / MB, "peak_rss_mb": sampler.peak / MB,
            "all_4xx_or_200": all(a.status == 200 or 400 <= a.status < 500 for a in answers),
            "shed_503_with_retry_after": sum(a.json_body and a.retry_after for a in shed), "shed_503": len(shed),
            "normal_request_after": after.status,
        }
    peak = max(s["peak_rss_mb"] for s in sets.values())
    hwm = high_water_bytes(pid) / MB
    over, under = sets.values()
    # the 40 MP set must be refused (4xx) or answered; the set under the limit is real work, more at once
    # than serve.max_queue admits, so the excess may also be shed: 503 with a JSON body and Retry-After
    answers_ok = over["all_4xx_or_200"] and all(
        k == "200" or k.startswith("4") or k == "503" for k in under["statuses"]
    ) and under["shed_503_with_retry_after"] == under["shed_503"]
    ok = peak * MB <= 1.5 * GIB and hwm * MB <= 1.5 * GIB and answers_ok and all(s["normal_request_after"] == 200 for s in sets.values())
    target = "peak RSS <= 1536 MB; 40 MP: every answer 4xx or 200; 24 MP: 200, 4xx or 503 shed with Retry-After; 200 after"
    return {"sets": sets, "peak_rss_mb": peak, "vmhwm_mb": hwm, "target": target, "pass": ok}


def overload(args: argparse.Namespace, pid: int, port: int, requests: list[bytes], pooled: set[int]) -> dict[str, object]:
    """`pooled`: indexes of the requests whose image is decoded in the thread pool. The load generator's own
    garbage collector is off meanwhile: a full collection over its tens of thousands of answers paused it ~0.5 s
    once in most runs, and every request in flight then looked 0.5 s slower than the service answered it."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return measure_overload(args, pid, port, requests, pooled)
    finally:
        gc.enable()
        gc.unfreeze()


def measure_overload(args: argparse.Namespace, pid: int, port: int, requests: list[bytes], pooled: set[int]) -> dict[str, object]:
    asyncio.run(closed_loop(port, requests, 4, seconds=2.0))  # warm-up
    unloaded = asyncio.run(closed_loop(port, requests, 1, seconds=args.unloaded_s))
    capacity_answers = asyncio.run(closed_loop(port, requests, 16, seconds=args.capacity_s))
    capacity = sum(a.status == 200 for a in capacity_answers) / args.capacity_s
    rate = args.rate or 4 * capacity
    # a few seconds at the same rate first: ONNX Runtime's memory arena grows to the largest batches the
    # overload makes and keeps that memory (a plateau, not a leak); "after" is compared with that plateau
    asyncio.run(open_loop(port, requests, rate, 3.0, args.max_conns))
    time.sleep(2.0)
    rss_before = rss_bytes(pid)
    started, retried = time.process_time(), Connection.retried
    server0, loop0 = cpu_seconds(pid), cpu_seconds(pid, thread=pid)  # the main thread runs the event loop
    metrics_before = scrape(port)
    answers, offered = asyncio.run(open_loop(port, requests, rate, args.overload_s, args.max_conns))
    offered["session_runs"] = runs_between(metrics_before, scrape(port))
    offered["resent_after_stale_keep_alive"] = Connection.retried - retried
    offered["server_cores"] = (cpu_seconds(pid) - server0) / offered["elapsed_s"]
    offered["event_loop_cores"] = (cpu_seconds(pid, thread=pid) - loop0) / offered["elapsed_s"]
    client_cpu = time.process_time() - started
    time.sleep(5.0)
    rss_after = rss_bytes(pid)
    accepted = [a.seconds for a in answers if a.status == 200]
    unloaded_p99 = p([a.seconds for a in unloaded if a.status == 200], 99)
    others = sum(a.status not in (200, 503) for a in answers)
    refused = [a for a in answers if a.status == 503]
    result = {
        "unloaded": {"requests": len(unloaded), "p50_ms": p([a.seconds for a in unloaded], 50), "p99_ms": unloaded_p99},
        "capacity_rps": capacity, "capacity_statuses": statuses(capacity_answers),
        "capacity_p50_ms": p([a.seconds for a in capacity_answers], 50), "capacity_p99_ms": p([a.seconds for a in capacity_answers], 99),
        "rate_rps": rate, **offered, "seconds": args.overload_s, "statuses": statuses(answers),
        "answered_200_rps": len(accepted) / offered["elapsed_s"],
        "accepted_p50_ms": p(accepted, 50), "accepted_p99_ms": p(accepted, 99),
        "p99_ratio": p(accepted, 99) / unloaded_p99 if accepted else float("nan"),
        "other_than_200_503": others,
        # where the slow answers come from: images decoded in the thread pool vs on the event loop, and time
        "accepted_p99_ms_by_decode": {
            kind: p([a.seconds for a in answers if a.status == 200 and (a.index in pooled) == (kind == "pool")], 99) for kind in ("inline", "pool")
        },
        "accepted_p99_ms_by_second": [
            round(p([a.seconds for a in answers if a.status == 200 and k <= a.sent_at < k + 1], 99), 1) for k in range(int(args.overload_s))
        ],
        "refused_with_json_and_retry_after": sum(a.json_body and a.retry_after for a in refused), "refused": len(refused),
        "rss_before_mb": rss_before / MB, "rss_after_mb": rss_after / MB, "rss_change_mb": (rss_after - rss_before) / MB,
        "load_generator_cpu_s": client_cpu,
    }
    result["target"] = "0 answers other than 200/503, accepted p99 <= 3x unloaded p99, RSS within 50 MB after"
    result["pass"] = others == 0 and result["p99_ratio"] <= 3.0 and abs(result["rss_change_mb"]) <= 50
    return result


def soak(args: argparse.Namespace, pid: int, port: int, requests: list[bytes], warm_up: int) -> dict[str, object]:
    asyncio.run(closed_loop(port, requests, 16, count=warm_up))
    rss_start = rss_bytes(pid)
    trace, answers = [], []
    chunk = max(1, args.soak // 10)
    start = time.perf_counter()
    for done in range(0, args.soak, chunk):
        answers += asyncio.run(closed_loop(port, requests, 16, count=min(chunk, args.soak - done)))
        trace.append(round(rss_bytes(pid) / MB, 1))
    seconds = time.perf_counter() - start
    rss_end = rss_bytes(pid)
    errors = sum(a.status != 200 for a in answers)
    return {
        "requests": len(answers), "warm_up_requests": warm_up, "seconds": seconds, "rps": len(answers) / seconds,
        "errors": errors, "statuses": statuses(answers), "p99_ms": p([a.seconds for a in answers], 99),
        "rss_start_mb": rss_start / MB, "rss_end_mb": rss_end / MB, "rss_growth_mb": (rss_end - rss_start) / MB, "rss_trace_mb": trace,
        "target": "RSS growth <= 50 MB, 0 errors", "pass": errors == 0 and (rss_end - rss_start) <= 50 * MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, help="A Lensmith project: serve its registry production model")
    where.add_argument("--model", type=Path, help="A model folder (model.onnx, export.json) to serve")
    parser.add_argument("--arch", default="efficientnet_lite0", help="Backbone of the model built when neither --root nor --model is given")
    parser.add_argument("--image-size", type=int, default=224, help="Its input size")
    parser.add_argument("--clients", type=int, default=3, help="(a) clients sending bombs at once")
    parser.add_argument("--bombs", type=int, default=16, help="(a) PNGs per client, each in its own request")
    parser.add_argument("--unloaded-s", type=float, default=5.0, help="(b) one client, one request at a time, for this long")
    parser.add_argument("--capacity-s", type=float, default=10.0, help="(b) 16 clients back to back, for this long")
    parser.add_argument("--overload-s", type=float, default=60.0, help="(b) open-loop arrivals at 4x capacity, for this long")
    parser.add_argument(
        "--rate", type=float, default=0.0,
        help="(b) offered rate of the overload in req/s; 0 = 4x the measured capacity (pin it to compare builds whose "
        "admission answers part of the 16 clients with 503, which lowers the capacity measured in 200s)",
    )
    parser.add_argument("--max-conns", type=int, default=200, help="(b) most connections the load generator opens")
    parser.add_argument("--soak", type=int, default=50_000, help="(c) normal requests")
    parser.add_argument("--serve", action="append", default=[], metavar="KEY=VALUE", help="A serve.* parameter, e.g. max_queue=32")
    parser.add_argument("--phases", default="abc", help="Which phases to run: any of a (hostile), b (overload), c (soak)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/serve_load.json"))
    args = parser.parse_args()
    for name, limit in (("--soak", 1_000_000), ("--overload-s", 600), ("--bombs", 64), ("--clients", 16)):
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if not 0 < value <= limit:
            raise SystemExit(f"{name} must be in (0, {limit}]")

    serve: dict[str, object] = {"review_threshold": 0.0}  # every prediction logged, none copied to the review queue
    for item in args.serve:
        key, _, value = item.partition("=")
        serve[key.removeprefix("serve.")] = yaml.safe_load(value)
    effective = Params.model_validate({"serve": serve}).serve
    images = normal_images()
    requests = [multipart_predict_request(HOST, data, ctype, "x") for data, ctype in images]
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_vnni") if f in Path("/proc/cpuinfo").read_text()})
    report: dict[str, object] = {
        "cores": os.cpu_count(), "cpu_flags": flags, "load_average_before": os.getloadavg()[0],
        "serve": serve, "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="lensmith-bench-serve-load-") as tmp:
        work = Path(tmp)
        if not args.root and not args.model:
            from lensmith.testing.servekit import make_exported_project

            print(f"building a small project with an exported {args.arch} at {args.image_size} px (~20-60 s)...", flush=True)
            make_exported_project(work, arch=args.arch, image_size=args.image_size)
        process, port = start_server(args, work, serve)
        try:
            print(f"lensmith serve on {HOST}:{port} (pid {process.pid}); RSS {rss_bytes(process.pid) / MB:.0f} MB", flush=True)
            report["rss_at_start_mb"] = rss_bytes(process.pid) / MB
            if "a" in args.phases:
                print("(a) hostile uploads...", flush=True)
                report["hostile"] = hostile(args, process.pid, port, requests[0])
            if "b" in args.phases:
                print("(b) overload...", flush=True)
                pooled = {i for i, (data, _) in enumerate(images) if pixels(data) > 256 * 256}
                report["overload"] = overload(args, process.pid, port, requests, pooled)
            if "c" in args.phases:
                print("(c) soak...", flush=True)
                report["soak"] = soak(args, process.pid, port, requests, warm_up=effective.feedback_window)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        report["load_average_after"] = os.getloadavg()[0]
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


def print_table(report: dict) -> None:  # noqa: ANN001
    mark = {True: "PASS", False: "FAIL"}
    print(f"\n{report['cores']} cores ({', '.join(report['cpu_flags']) or 'no avx2'}), load average {report['load_average_before']:.1f} -> {report['load_average_after']:.1f}; serve {report['serve']}")
    print(f"{'phase':<12} {'result':<92} {'target'}")
    if "hostile" in report:
        print_hostile(report["hostile"], mark)
    if "overload" in report:
        print_overload(report["overload"], mark)
    if "soak" in report:
        print_soak(report["soak"], mark)


def print_hostile(h: dict, mark: dict) -> None:  # noqa: ANN001
    for name, values in h["sets"].items():
        shed = f" ({values['shed_503_with_retry_after']}/{values['shed_503']} 503 with Retry-After)" if values["shed_503"] else ""
        print(f"{'(a) bombs':<12} {name}: {values['requests']} x {values['png_bytes'] / 1024:.0f} KB PNG, {values['statuses']}{shed}, "
              f"{values['seconds']:.1f} s, peak RSS {values['peak_rss_mb']:.0f} MB, after: {values['normal_request_after']}")
    line = f"peak RSS {h['peak_rss_mb']:.0f} MB sampled, VmHWM {h['vmhwm_mb']:.0f} MB"
    print(f"{'(a) total':<12} {line:<92} <= 1536 MB  {mark[h['pass']]}")


def print_overload(o: dict, mark: dict) -> None:  # noqa: ANN001
    print(f"{'(b) base':<12} unloaded p50 {o['unloaded']['p50_ms']:.1f} ms p99 {o['unloaded']['p99_ms']:.1f} ms; capacity {o['capacity_rps']:.0f} req/s "
          f"(16 clients: p50 {o['capacity_p50_ms']:.1f} ms p99 {o['capacity_p99_ms']:.1f} ms, {o['capacity_statuses']})")
    print(f"{'(b) 4x load':<12} {o['offered']} offered at {o['offered_rate']:.0f}/s ({o['late_sends']} late, {o['connections']} conns, "
          f"{o['resent_after_stale_keep_alive']} resent) for {o['seconds']:.0f} s: {o['statuses']}; server {o['server_cores']:.2f} cores "
          f"(event loop {o['event_loop_cores']:.2f}), load generator {o['load_generator_cpu_s'] / o['elapsed_s']:.2f}")
    line = (f"200s {o['answered_200_rps']:.0f}/s, p50 {o['accepted_p50_ms']:.1f} ms p99 {o['accepted_p99_ms']:.1f} ms = {o['p99_ratio']:.1f}x unloaded; "
            f"{o['refused_with_json_and_retry_after']}/{o['refused']} 503 JSON+Retry-After; RSS {o['rss_change_mb']:+.0f} MB")
    print(f"{'(b) result':<12} {line:<92} others 0, <= 3x, |RSS| <= 50 MB  {mark[o['pass']]}")
    runs = o["session_runs"]
    print(f"{'(b) runs':<12} {runs['runs']:.0f} session runs, mean {runs['mean_run_ms']:.1f} ms, {runs['mean_batch_images']:.2f} images each; "
          f"admission: {runs['seconds_per_image_ms']:.1f} ms per image, budget {runs['budget_ms']:.1f} ms; admission to run start: "
          f"mean {runs['mean_queue_wait_ms']:.1f} ms, p99 <= {runs['queue_wait_p99_bucket_ms']:.0f} ms")
    gc = runs.get("gc", {})
    if gc:
        print(f"{'(b) gc':<12} " + "; ".join(
            f"gen {g}: {v['collections']:.0f} collections, {v['total_ms']:.0f} ms in all, longest <= {v['longest_le_ms']:.1f} ms" for g, v in gc.items()
        ))
    by = o["accepted_p99_ms_by_decode"]
    print(f"{'(b) detail':<12} p99 of 200s by decode: inline {by['inline']:.0f} ms, thread pool {by['pool']:.0f} ms; "
          f"by second of the run: {o['accepted_p99_ms_by_second']}")


def print_soak(s: dict, mark: dict) -> None:  # noqa: ANN001
    line = (f"{s['requests']} requests in {s['seconds']:.0f} s ({s['rps']:.0f}/s), errors {s['errors']}, p99 {s['p99_ms']:.1f} ms, "
            f"RSS {s['rss_start_mb']:.0f} -> {s['rss_end_mb']:.0f} MB ({s['rss_growth_mb']:+.1f})")
    print(f"{'(c) soak':<12} {line:<92} <= 50 MB, 0 errors  {mark[s['pass']]}")


if __name__ == "__main__":
    main()
