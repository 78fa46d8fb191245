"""Serving under hostile uploads, overload and bad promotions (issue #16): pixel limits from the headers,
reduced decoding, bounded decodes, supported formats only, a bounded queue and a deadline answered 503 with
Retry-After, hot reload that warms a model up before it takes over (and backs off when it cannot), and
nothing from a request or the server's paths leaking into answers or log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from servekit import copy_project, jpeg_bytes, tiny_params

from lensmith.errors import ImageRejected, LensmithError
from lensmith.imageio import decode_image
from lensmith.layout import Layout
from lensmith.params import ServeParams
from lensmith.preprocess import Preprocessing
from lensmith.serve.app import create_app
from lensmith.serve.models import ModelHolder, PathSource, RegistrySource, ServedModel, warm_up

pytestmark = pytest.mark.timeout(600)
TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]


def serve_params(**changes: object) -> ServeParams:
    return ServeParams.model_validate({**tiny_params().serve.model_dump(), **changes})


def run(go, layout: Layout, params: ServeParams | None = None, source=None):  # noqa: ANN001, ANN201
    """`await go(client, service)` against the app in-process (lifespan started, model loaded)."""

    async def main():  # noqa: ANN202
        app = create_app(params or serve_params(), layout.root, source or PathSource(layout.exported), token=TOKEN)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith", timeout=60) as client:
                return await go(client, app.state.service)

    return asyncio.run(main())


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return copy_project(tmp_path)


def encoded(img: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def palette_bomb(width: int = 6000, height: int = 6666) -> bytes:
    """A palette PNG of one colour: tens of KB on the wire, width x height pixels once decoded."""
    img = Image.new("P", (width, height), 0)
    img.putpalette([i % 256 for i in range(768)])
    return encoded(img, "PNG")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some texture (what a camera gives, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 128 + 60 * np.sin(xx / (width / 7)) * np.cos(yy / (height / 5))
    pixels = np.stack([base, base * 0.8 + 30, 255 - base], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def post(client: httpx.AsyncClient, *images: tuple[bytes, str]):  # noqa: ANN201
    files = [("files", (f"{i}.img", data, ctype)) for i, (data, ctype) in enumerate(images)]
    return client.post("/v1/predict", files=files)


# ---- pixel limits, reduced decoding, formats --------------------------------------------------------------


def test_a_palette_png_bomb_is_refused_from_its_header(layout: Layout) -> None:
    bomb = palette_bomb()
    assert len(bomb) < 100_000  # 40 MP for ~40 KB

    async def go(client, service):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        response = await post(client, (bomb, "image/png"))
        return response, time.perf_counter() - started

    response, seconds = run(go, layout, serve_params())  # the default serve.max_pixels
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_large" and "serve.max_pixels" in response.json()["error"]["message"]
    assert seconds < 1.0  # nothing was decoded


def test_a_request_over_the_pixel_budget_is_refused_before_any_image_is_decoded(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve import predict as predict_module

    decoded = []
    real = predict_module.decode_opened
    monkeypatch.setattr(predict_module, "decode_opened", lambda *a, **k: decoded.append(1) or real(*a, **k))
    image = (jpeg_bytes(1, size=(300, 300)), "image/jpeg")

    async def go(client, service):  # noqa: ANN001, ANN202
        return await post(client, image), await post(client, image, image)

    one, two = run(go, layout, serve_params(max_request_pixels=100_000))
    assert one.status_code == 200
    assert two.status_code == 413 and "serve.max_request_pixels" in two.json()["error"]["message"]
    assert len(decoded) == 1  # only the first request's image


def test_a_large_palette_png_is_decoded_reduced_within_a_fraction_of_its_full_size(tmp_path: Path) -> None:
    """Peak memory of serving's decode path (header check, reduced decode, statistics, model input) in a
    fresh process: a 24 MP palette PNG (1 byte a pixel in the file's mode, 72 MB as RGB) must not cost much
    more than its own palette pixels. Before, the same path peaked at ~17 bytes a pixel (~400 MB)."""
    width, height = 4000, 6000
    (tmp_path / "big.png").write_bytes(palette_bomb(width, height))
    (tmp_path / "small.png").write_bytes(palette_bomb(1000, 1000))
    script = f"""
import resource, sys
from types import SimpleNamespace
from lensmith.preprocess import Preprocessing
from lensmith.params import ServeParams
from lensmith.serve.predict import prepare, read_headers
model = SimpleNamespace(onnx=SimpleNamespace(preprocessing=Preprocessing(image_size=224, resize=224)))
params = ServeParams()
warm = open({str(tmp_path / 'small.png')!r}, 'rb').read()
prepare([warm], read_headers([warm], params), model, params.max_pixels)  # codecs and numpy paths loaded
data = open({str(tmp_path / 'big.png')!r}, 'rb').read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
uploads, inputs = prepare([data], read_headers([data], params), model, params.max_pixels)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(peak * 1024, inputs.shape, uploads[0].width, uploads[0].height, uploads[0].reduction)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    peak, *rest = out.stdout.split()
    assert " ".join(rest) == f"(1, 224, 224, 3) {width} {height} 8"
    full_rgb = width * height * 3
    assert int(peak) < full_rgb * 0.8, f"peak {int(peak) / 1e6:.0f} MB for a {full_rgb / 1e6:.0f} MB RGB image"


def test_large_uploads_are_decoded_reduced_and_normal_ones_exactly_as_before() -> None:
    pre = Preprocessing(image_size=224, resize=224)
    min_side = 2 * pre.resize
    # below 4x the model's resize: no reduction at all, the very same pixels
    normal = encoded(photo(880, 640), "JPEG", quality=92)
    full, reduced = decode_image(normal), decode_image(normal, min_short_side=min_side)
    assert reduced.reduction == 1 and np.array_equal(np.asarray(full.image), np.asarray(reduced.image))
    # a large JPEG: DCT-scaled while decoding; a large PNG: reduced after decoding; the model's input stays close
    for fmt, expected in (("JPEG", 4), ("PNG", 4)):
        data = encoded(photo(3000, 2000), fmt)
        full, reduced = decode_image(data), decode_image(data, min_short_side=min_side)
        assert reduced.reduction == expected and min(reduced.image.size) >= min_side, fmt
        assert reduced.original_size == (3000, 2000)
        difference = np.abs(pre.to_uint8(full.image).astype(int) - pre.to_uint8(reduced.image).astype(int))
        assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8, (fmt, difference.mean())


def test_orientation_is_applied_to_reduced_images() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encoded(photo(2400, 1000), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, min_short_side=100)
    assert decoded.original_size == (1000, 2400)
    assert decoded.image.width < decoded.image.height and decoded.reduction == 8


GIF = encoded(Image.new("RGB", (20, 20), (200, 10, 10)), "GIF")
ICO = encoded(Image.new("RGB", (32, 32), (10, 200, 10)), "ICO")


def test_unsupported_formats_get_415_in_serving(layout: Layout) -> None:
    async def go(client, service):  # noqa: ANN001, ANN202
        return await post(client, (GIF, "image/gif")), await post(client, (ICO, "image/x-icon"))

    for response in run(go, layout):
        assert response.status_code == 415, response.text
        error = response.json()["error"]
        assert error["code"] == "unsupported_format" and "JPEG, PNG" in error["message"]


def test_unsupported_formats_are_rejected_by_the_shared_decoder_and_quarantined_by_ingest(tmp_path: Path) -> None:
    from conftest import write_test_image
    import pandas as pd

    from lensmith.ingest import run_ingest
    from lensmith.params import Params

    with pytest.raises(ImageRejected) as caught:
        decode_image(GIF)
    assert caught.value.reason == "unsupported_format" and "GIF" in caught.value.detail
    with pytest.raises(ImageRejected) as caught:
        decode_image(b"GIF? no, just text pretending to be a picture")
    assert caught.value.reason == "not_an_image"

    source = tmp_path / "source"
    for i in range(4):
        write_test_image(source / "ok" / f"good_{i}.png", seed=i)
    (source / "ok" / "animated.png").write_bytes(GIF)  # a GIF under a supported extension
    params = Params()
    params.data.source, params.data.workers, params.validate.max_bad_fraction = str(source), 1, 0.5
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params, layout)
    quarantine = pd.read_csv(layout.quarantine, keep_default_na=False)
    assert summary.n_quarantined == 1
    assert quarantine[["path", "reason"]].values.tolist() == [["ok/animated.png", "unsupported_format"]]


def test_decodes_run_at_most_max_concurrent_decodes_at_once(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve import predict as predict_module

    running, peak, lock = 0, 0, threading.Lock()
    real = predict_module.prepare

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.15)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(predict_module, "prepare", counted)
    big = jpeg_bytes(3, size=(400, 300))  # over INLINE_MAX_PIXELS: decoded in the thread pool

    async def go(client, service):  # noqa: ANN001, ANN202
        return await asyncio.gather(*(post(client, (big, "image/jpeg")) for _ in range(4)))

    responses = run(go, layout, serve_params(max_concurrent_decodes=1))
    assert [r.status_code for r in responses] == [200] * 4
    assert peak == 1


def test_requests_waiting_for_a_decode_count_against_the_queue(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve import predict as predict_module

    real = predict_module.prepare
    monkeypatch.setattr(predict_module, "prepare", lambda *a, **k: time.sleep(0.5) or real(*a, **k))
    big = jpeg_bytes(3, size=(400, 300))

    async def go(client, service):  # noqa: ANN001, ANN202
        first = asyncio.create_task(post(client, (big, "image/jpeg")))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if service.preparing == 1:
                break
        refused = await post(client, (big, "image/jpeg"))
        return await first, refused

    first, refused = run(go, layout, serve_params(max_queue=1, max_concurrent_decodes=1))
    assert first.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


def test_failure_log_lines_are_limited_per_second(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from lensmith.serve import metrics as metrics_module

    now = [100.0]
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    limiter = metrics_module.LineLimiter(per_second=3)
    with caplog.at_level(logging.INFO, logger="lensmith.serve"):
        first = [limiter.allow() for _ in range(10)]
        now[0] += 1.0
        second = limiter.allow()
    assert first == [True] * 3 + [False] * 7 and second is True
    assert [r.getMessage() for r in caplog.records] == ["7 more failed requests were not logged one by one (lensmith_requests_total counts them all)"]


# ---- overload: bounded queue and deadline ----------------------------------------------------------------


def blocking_runs(service, release: threading.Event, started: threading.Event):  # noqa: ANN001, ANN201
    """Make the service's session runs wait for `release` (the model is busy)."""
    real = service.batcher._run

    def run(model, batch):  # noqa: ANN001, ANN202
        started.set()
        release.wait(20)
        return real(model, batch)

    service.batcher._run = run


def test_a_full_queue_is_answered_503_with_retry_after(layout: Layout) -> None:
    async def go(client, service):  # noqa: ANN001, ANN202
        release, started = threading.Event(), threading.Event()
        blocking_runs(service, release, started)
        first = asyncio.create_task(post(client, (jpeg_bytes(1), "image/jpeg")))
        await asyncio.to_thread(started.wait, 10)  # the only runner is busy with it
        second = asyncio.create_task(post(client, (jpeg_bytes(2), "image/jpeg")))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if service.batcher.waiting == 1:
                break
        refused = [await post(client, (jpeg_bytes(3), "image/jpeg")) for _ in range(2)]
        metrics = (await client.get("/metrics")).text
        release.set()
        return await first, await second, refused, metrics, service.batcher.waiting

    first, second, refused, metrics, waiting = run(go, layout, serve_params(runners=1, max_batch_size=1, max_queue=1))
    assert first.status_code == 200 and second.status_code == 200
    for response in refused:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "overloaded" and "serve.max_queue" in response.json()["error"]["message"]
    assert 'lensmith_rejected_requests_total{reason="queue_full"} 2.0' in metrics
    assert "lensmith_queue_depth 1.0" in metrics and waiting == 0


def test_a_request_past_its_deadline_is_answered_503_and_never_run(layout: Layout) -> None:
    async def go(client, service):  # noqa: ANN001, ANN202
        release, started = threading.Event(), threading.Event()
        blocking_runs(service, release, started)
        answers = await asyncio.gather(post(client, (jpeg_bytes(1), "image/jpeg")), post(client, (jpeg_bytes(2), "image/jpeg")))
        waiting = service.batcher.waiting
        release.set()
        await asyncio.sleep(0.5)
        after = await post(client, (jpeg_bytes(3), "image/jpeg"))  # the service recovers
        return answers, waiting, list(service.batcher.batch_sizes), after

    answers, waiting, sizes, after = run(go, layout, serve_params(runners=1, max_batch_size=1, request_timeout_s=0.5))
    for response in answers:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded" and "serve.request_timeout_s" in response.json()["error"]["message"]
    assert waiting == 0  # the queued request left the queue when it gave up
    assert after.status_code == 200
    assert sizes == [1, 1]  # the first (already running) request's batch and the last one: the queued one never ran


def test_lensmith_serve_passes_its_connection_limits_to_uvicorn(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    import yaml
    from typer.testing import CliRunner

    from lensmith.cli import app

    captured: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kwargs: captured.update(kwargs))
    params_file = layout.root / "params.yaml"
    params_file.write_text(yaml.safe_dump({"serve": {"max_connections": 40, "keep_alive_s": 3.0}}))
    result = CliRunner().invoke(app, ["serve", "--model", str(layout.exported), "--root", str(layout.root), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert captured["limit_concurrency"] == 40 and captured["backlog"] == 40 and captured["timeout_keep_alive"] == 3.0
    assert captured["server_header"] is False


# ---- hot reload: warm-up, degraded readiness, back-off, production-only fingerprint -----------------------


def register(layout: Layout, promote: bool = True) -> str:
    from lensmith.registry import Registry

    meta = json.loads((layout.candidate / "meta.json").read_text())
    metrics, gate = layout.reports / "metrics.json", layout.reports / "gate.json"
    metrics.write_text(json.dumps({"test": {"accuracy": 0.5}}))
    registry = Registry(layout.models)
    champion = registry.aliases()["production"]  # what a gate run now would have compared against
    gate.write_text(json.dumps({"passed": True, "decision": "promote", "champion_version": champion,
                                "candidate": {"weights_sha256": meta["weights_sha256"]}}))
    version = registry.register(layout.candidate, metrics_path=metrics, gate_path=gate, export_path=layout.exported / "export.json")
    if promote:
        registry.promote(version)
    return version


def break_exported_model(layout: Layout) -> None:
    """Rewrite the exported ONNX files' preprocessing to one gray channel: the model loads, then every
    inference fails in ONNX Runtime (the graph wants 3 channels)."""
    import onnx

    for path in layout.exported.glob("*.onnx"):
        model = onnx.load(str(path))
        for prop in model.metadata_props:
            if prop.key == "lensmith.preprocessing":
                pre = json.loads(prop.value)
                pre.update(channels="L", mean=[0.5], std=[0.25])
                prop.value = json.dumps(pre)
        onnx.save(model, str(path))


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_a_model_failing_at_inference_never_takes_over_and_readiness_says_degraded(layout: Layout) -> None:
    from lensmith.registry import Registry

    good = register(layout)
    break_exported_model(layout)

    async def go(client, service):  # noqa: ANN001, ANN202
        seen = []
        bad = await asyncio.to_thread(register, layout)
        for _ in range(100):
            seen.append(await post(client, (jpeg_bytes(len(seen)), "image/jpeg")))
            if service.holder.failure is not None:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # polls every 0.2 s; retries of the same model back off
        seen.append(await post(client, (jpeg_bytes(1), "image/jpeg")))
        degraded = await client.get("/v1/ready"), (await client.get("/metrics")).text, (await client.get("/v1/model")).json()
        attempts = service.holder.failure.attempts
        await asyncio.to_thread(Registry(layout.models).rollback)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if service.holder.failure is None:
                break
        recovered = await client.get("/v1/ready"), (await client.get("/metrics")).text
        return bad, seen, degraded, attempts, recovered

    bad, seen, (ready, metrics, info), attempts, (ready_after, metrics_after) = run(
        go, layout, serve_params(reload_poll_s=0.2), source=RegistrySource(layout.models)
    )
    assert [r.status_code for r in seen] == [200] * len(seen)
    assert {r.json()["model_version"] for r in seen} == {good}  # the broken model never answered
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["error"]["code"] == "degraded" and body["degraded"] is True
    assert body["model_version"] == good and body["wanted"] == bad and bad in body["error"]["message"]
    assert str(layout.root) not in ready.text
    assert info["version"] == good and info["degraded"] is True
    assert metric(metrics, "lensmith_model_degraded") == 1.0
    assert metric(metrics, "lensmith_model_reload_failures_total") == attempts
    # 1.5 s of polls every 0.2 s would be ~8 attempts; backing off 0.2, 0.4, 0.8, 1.6 s allows at most 4
    assert 1 <= attempts <= 4
    assert ready_after.status_code == 200 and ready_after.json()["model_version"] == good
    assert metric(metrics_after, "lensmith_model_degraded") == 0.0


def test_a_change_to_another_alias_does_not_rebuild_the_session(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.registry import Registry
    from lensmith.serve import models as models_module

    first = register(layout)
    fingerprint = RegistrySource(layout.models).fingerprint()
    loads = []
    real = models_module.load_served_model
    monkeypatch.setattr(models_module, "load_served_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))

    async def go(client, service):  # noqa: ANN001, ANN202
        loaded = len(loads)
        second = await asyncio.to_thread(register, layout, False)  # a new candidate: aliases.json rewritten
        aliases = Registry(layout.models).aliases_path
        aliases.write_text(aliases.read_text())  # rewritten as it was (a new mtime)
        await asyncio.sleep(1.0)
        unchanged = len(loads) - loaded
        await asyncio.to_thread(Registry(layout.models).promote, second)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if service.holder.current.version == second:
                break
        return unchanged, service.holder.current.version, second

    unchanged, serving, second = run(go, layout, serve_params(reload_poll_s=0.2), source=RegistrySource(layout.models))
    assert unchanged == 0
    assert serving == second  # a production change still reloads
    assert RegistrySource(layout.models).fingerprint() != fingerprint and fingerprint.startswith(f"{first}|")


class FakeOnnx:
    def __init__(self, output) -> None:  # noqa: ANN001
        self.preprocessing = Preprocessing(image_size=8, resize=8)
        self.classes = ["a", "b", "c"]
        self.output = output

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.output(len(x))


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda n: np.full((n, 3), np.nan, np.float32), "non-finite"),
        (lambda n: np.zeros((n, 2), np.float32), "shape"),
        (lambda n: np.zeros((1, 3), np.float32), "shape"),  # a fixed batch of one
        (lambda n: (_ for _ in ()).throw(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT")), "failed its warm-up"),
    ],
    ids=["nan", "wrong-classes", "fixed-batch", "raises"],
)
def test_warm_up_refuses_models_whose_outputs_are_unusable(output, message: str) -> None:  # noqa: ANN001
    model = ServedModel(onnx=FakeOnnx(output), version="v0009", variant="fp32", file="model.onnx")  # type: ignore[arg-type]
    with pytest.raises(LensmithError, match=message):
        warm_up(model)
    warm_up(ServedModel(onnx=FakeOnnx(lambda n: np.zeros((n, 3), np.float32)), version="v1", variant="fp32", file="m"))  # type: ignore[arg-type]


def test_retries_of_a_failing_model_back_off_exponentially_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve import models as models_module

    now = [1000.0]
    monkeypatch.setattr(models_module, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    tries = []

    class Broken:
        def fingerprint(self) -> str:
            return "v0002|same"

        def locate(self) -> Path:
            tries.append(now[0])
            raise LensmithError("cannot load /srv/models/v0002")

        def describe(self) -> str:
            return "broken"

    holder = ModelHolder(Broken(), ["CPUExecutionProvider"], "auto", 1, retry_s=2.0, retry_max_s=10.0)
    for _ in range(60):  # a poll every second for a minute
        try:
            holder.reload(False)
        except LensmithError:
            pass
        now[0] += 1.0
    gaps = np.diff(tries).tolist()
    assert gaps[:3] == [2.0, 4.0, 8.0] and set(gaps[3:]) == {10.0}
    with pytest.raises(LensmithError):  # an explicit reload (admin) tries at once
        holder.reload(True)
    assert tries[-1] == now[0]


# ---- what answers and log lines may say --------------------------------------------------------------------


def test_the_unauthenticated_503_names_no_server_path(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "empty")

    async def go(client, service):  # noqa: ANN001, ANN202
        return await client.get("/v1/ready"), await post(client, (jpeg_bytes(1), "image/jpeg"))

    for response in run(go, layout, source=RegistrySource(layout.models)):
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_model"
        assert str(tmp_path) not in response.text and "registry" not in response.text


def test_request_paths_are_escaped_in_log_lines(layout: Layout, caplog: pytest.LogCaptureFixture) -> None:
    async def go(client, service):  # noqa: ANN001, ANN202
        return await client.get("/v1/nothing%0A2026-01-01 INFO lensmith.serve: forged%1B[31m")

    with caplog.at_level(logging.INFO, logger="lensmith.serve"):
        response = run(go, layout)
    assert response.status_code == 404
    (line,) = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("GET /v1/nothing\\n2026-01-01 INFO lensmith.serve: forged\\x1b[31m 404 from")
