"""The service in-process (httpx + ASGI transport) on a real exported model and real images."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from servekit import copy_project, jpeg_bytes, png_bytes, tiny_params

from lensmith.layout import Layout
from lensmith.params import ServeParams
from lensmith.serve.app import create_app
from lensmith.serve.models import PathSource, RegistrySource
from lensmith.serve.predlog import read_log
from lensmith.serve.review import read_queue

pytestmark = pytest.mark.timeout(900)
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def serve_params(**changes: object) -> ServeParams:
    return tiny_params().serve.model_copy(update=changes)


class Running:
    def __init__(self, app, client: httpx.AsyncClient, layout: Layout) -> None:
        self.app, self.client, self.layout = app, client, layout

    @property
    def service(self):  # noqa: ANN201
        return self.app.state.service


async def start(layout: Layout, params: ServeParams, source=None, token: str | None = TOKEN) -> AsyncIterator[Running]:
    app = create_app(params, layout.root, source or PathSource(layout.exported), token=token or "")
    if token is None:
        app.state.service.token = None
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith") as client:
            yield Running(app, client, layout)


def run(coro_fn, layout: Layout, params: ServeParams | None = None, **kw):  # noqa: ANN001, ANN201
    async def main():  # noqa: ANN202
        async for running in start(layout, params or serve_params(), **kw):
            return await coro_fn(running)

    return asyncio.run(main())


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return copy_project(tmp_path)


def one(data: bytes = b"", name: str = "a.jpg", ctype: str = "image/jpeg") -> dict:
    return {"files": {"file": (name, data or jpeg_bytes(1), ctype)}}


# ---- predict ---------------------------------------------------------------------------------------------


def test_predict_one_and_several_images_returns_every_field(layout: Layout) -> None:
    async def go(s: Running):
        single = await s.client.post("/v1/predict", **one())
        several = await s.client.post(
            "/v1/predict", files=[("files", ("a.jpg", jpeg_bytes(2), "image/jpeg")), ("files", ("b.png", png_bytes(3), "image/png"))]
        )
        return single, several

    single, several = run(go, layout)
    assert single.status_code == 200 and several.status_code == 200
    body = single.json()
    (p,) = body["predictions"]
    classes = json.loads((layout.candidate / "meta.json").read_text())["classes"]
    assert p["label"] in classes and 0 < p["confidence"] <= 1
    assert [t["label"] for t in p["top_k"]][0] == p["label"] and len(p["top_k"]) == 3
    assert p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] >= p["top_k"][2]["probability"]
    assert p["needs_review"] == (p["confidence"] < 0.5)
    assert p["model_version"] == json.loads((layout.exported / "export.json").read_text())["model_version"]
    assert p["latency_ms"] > 0 and len(p["image_sha256"]) == 64
    assert len(several.json()["predictions"]) == 2


def test_prediction_matches_the_onnx_model_through_the_shared_preprocessing(layout: Layout) -> None:
    from PIL import Image
    import io

    from lensmith.onnxmodel import OnnxModel
    from lensmith.onnxmodel import onnx_file_for

    path, _ = onnx_file_for(layout.exported, "auto", ["CPUExecutionProvider"])
    expected = OnnxModel.load(path).probabilities([Image.open(io.BytesIO(jpeg_bytes(5))).convert("RGB")])[0]

    async def go(s: Running):
        return (await s.client.post("/v1/predict", **one(jpeg_bytes(5)))).json()["predictions"][0]

    p = run(go, layout)
    assert p["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)


def test_each_prediction_carries_the_decision_of_the_served_models_operating_point(layout: Layout) -> None:
    """decision (and the defect score) come from the rule the export chose on validation, stored in the served file."""
    from PIL import Image
    import io

    from lensmith.onnxmodel import OnnxModel, onnx_file_for

    model = OnnxModel.load(onnx_file_for(layout.exported, "auto", ["CPUExecutionProvider"])[0])
    rule = model.decision_rule()
    expected = model.probabilities([Image.open(io.BytesIO(jpeg_bytes(5))).convert("RGB")])[0]

    async def go(s: Running):
        prediction = (await s.client.post("/v1/predict", **one(jpeg_bytes(5)))).json()["predictions"][0]
        return prediction, (await s.client.get("/v1/model")).json()

    p, info = run(go, layout)
    assert p["decision"] == rule.decide(expected) and info["decision_rule"] == rule.as_dict()
    if rule.kind == "threshold":
        assert p["decision"] in {"defect", "ok"} and p["defect_score"] == pytest.approx(rule.defect_score(expected), abs=1e-6)
    log = read_log(layout.root / "serving" / "predictions")
    assert log[-1]["decision"] == p["decision"]


def test_a_review_decision_goes_to_the_review_queue(layout: Layout) -> None:
    """A review band covering every score: each prediction is `review`, needs review and is queued as such."""
    from lensmith.export import set_metadata
    from lensmith.onnxmodel import META_DECISION, OnnxModel, onnx_file_for
    from lensmith.operating import DecisionRule, OperatingPoint

    path = onnx_file_for(layout.exported, "auto", ["CPUExecutionProvider"])[0]
    classes = tuple(OnnxModel.load(path).classes)
    point = OperatingPoint(0.5, 0.0, 1.5, "min_recall", 0.95, None, 10.0, 1.0)
    rule = DecisionRule("threshold", classes, "ok", tuple(c for c in classes if c != "ok"), point)
    set_metadata(path, {META_DECISION: json.dumps(rule.as_dict())})

    async def go(s: Running):
        return (await s.client.post("/v1/predict", **one(jpeg_bytes(6)))).json()["predictions"][0]

    p = run(go, layout, ServeParams(review_threshold=0.0))
    assert p["decision"] == "review" and p["needs_review"] is True
    queued = read_queue(layout.root / "serving" / "review")
    assert [item["reason"] for item in queued] == ["review_band"]


def test_every_prediction_is_logged_with_image_stats_and_low_confidence_is_queued(layout: Layout) -> None:
    async def go(s: Running):
        return [(await s.client.post("/v1/predict", **one(jpeg_bytes(i)))).json()["predictions"][0] for i in range(3)]

    preds = run(go, layout, serve_params(review_threshold=1.0))  # every prediction is below 1.0
    records = read_log(layout.root / "serving/predictions")
    assert [r["id"] for r in records] == [p["id"] for p in preds]
    for r in records:
        assert {"time", "model_version", "label", "confidence", "image_sha256", "brightness", "contrast", "sharpness", "mean_r"} <= set(r)
    queue = read_queue(layout.root / "serving/review")
    assert [q["prediction_id"] for q in queue] == [p["id"] for p in preds]
    assert all((layout.root / "serving/review" / q["image"]).is_file() for q in queue)


def test_log_files_rotate_and_are_never_rewritten(layout: Layout) -> None:
    async def go(s: Running):
        for i in range(8):
            await s.client.post("/v1/predict", **one(jpeg_bytes(i)))

    run(go, layout, serve_params(log_rotate_bytes=1024))
    files = sorted((layout.root / "serving/predictions").glob("predictions-*.jsonl"))
    assert len(files) >= 2
    first = files[0].read_bytes()
    run(go, layout, serve_params(log_rotate_bytes=1024))
    assert files[0].read_bytes() == first
    assert len(read_log(layout.root / "serving/predictions")) == 16


BAD_INPUTS = {
    "empty body": ({"content": b""}, 400, "empty_body"),
    "non-image content type": ({"files": {"file": ("a.txt", b"hello", "text/plain")}}, 415, "unsupported_media_type"),
    "non-image bytes labelled as image": ({"files": {"file": ("a.png", b"%PDF-1.4 not an image", "image/png")}}, 400, "invalid_image"),
    "corrupt image": ({"files": {"file": ("a.jpg", jpeg_bytes(1)[:200], "image/jpeg")}}, 400, "invalid_image"),
    "too large": ({"files": {"file": ("a.jpg", b"\xff" * 300_000, "image/jpeg")}}, 413, "too_large"),
    "too many images": ({"files": [("files", (f"{i}.jpg", jpeg_bytes(i), "image/jpeg")) for i in range(5)]}, 400, "too_many_images"),
    "wrong field": ({"files": {"image": ("a.jpg", jpeg_bytes(1), "image/jpeg")}}, 400, "wrong_field"),
    "json instead of multipart": ({"json": {"file": "a.jpg"}}, 415, "unsupported_media_type"),
    "empty image file": ({"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "empty_file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_json_error(layout: Layout, case: str) -> None:
    kwargs, status, code = BAD_INPUTS[case]

    async def go(s: Running):
        return await s.client.post("/v1/predict", **kwargs)

    response = run(go, layout, serve_params(max_upload_bytes=200_000, max_images_per_request=4))
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    assert "Traceback" not in response.text and "File \"" not in response.text


def test_failed_requests_leave_a_log_line_without_the_access_log(layout: Layout, caplog: pytest.LogCaptureFixture) -> None:
    async def go(s: Running):
        return await s.client.post("/v1/predict", **one(jpeg_bytes(1))), await s.client.post("/v1/predict", content=b"")

    with caplog.at_level(logging.INFO, logger="lensmith.serve"):
        good, bad = run(go, layout)
    assert (good.status_code, bad.status_code) == (200, 400)
    lines = [r.getMessage() for r in caplog.records if r.name == "lensmith.serve"]
    assert any(line.startswith("POST /v1/predict 400 from") for line in lines), lines
    assert not any(" 200 " in line for line in lines)


def test_chunked_upload_over_the_limit_is_refused(layout: Layout) -> None:
    async def body():  # noqa: ANN202 - no Content-Length: the limit is enforced while streaming
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(10):
            yield b"\xff" * 50_000

    async def go(s: Running):
        return await s.client.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})

    response = run(go, layout, serve_params(max_upload_bytes=200_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


def test_an_image_over_max_pixels_is_refused_before_decoding(layout: Layout) -> None:
    async def go(s: Running):
        return await s.client.post("/v1/predict", **one(png_bytes(0, size=(400, 400)), "big.png", "image/png"))

    response = run(go, layout, serve_params(max_pixels=100_000))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


# ---- feedback and auth -----------------------------------------------------------------------------------


def test_feedback_needs_the_token_and_queues_the_image(layout: Layout) -> None:
    async def go(s: Running):
        pid = (await s.client.post("/v1/predict", **one(jpeg_bytes(7)))).json()["predictions"][0]["id"]
        return [
            await s.client.post("/v1/feedback", json={"prediction_id": pid, "label": "crack"}),
            await s.client.post("/v1/feedback", json={"prediction_id": pid, "label": "crack"}, headers={"Authorization": "Bearer nope"}),
            await s.client.post("/v1/feedback", json={"prediction_id": "0" * 32, "wrong": True}, headers=AUTH),
            await s.client.post("/v1/feedback", json={"prediction_id": pid, "label": "not-a-class"}, headers=AUTH),
            await s.client.post("/v1/feedback", json={"prediction_id": pid}, headers=AUTH),
            await s.client.post("/v1/feedback", json={"prediction_id": pid, "label": "crack"}, headers=AUTH),
            await s.client.post("/v1/feedback", json={"prediction_id": pid, "wrong": True}, headers=AUTH),
        ], pid

    (no_token, bad_token, unknown, bad_label, neither, ok, wrong), pid = run(go, layout, serve_params(review_threshold=0.0))
    assert (no_token.status_code, bad_token.status_code) == (401, 401)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_prediction"
    assert bad_label.status_code == 422 and bad_label.json()["error"]["code"] == "unknown_label"
    assert neither.status_code == 422
    assert ok.status_code == 201 and wrong.status_code == 201
    queue = read_queue(layout.root / "serving/review")
    assert [(q["prediction_id"], q["feedback_label"], q["reason"]) for q in queue] == [(pid, "crack", "feedback"), (pid, "wrong", "feedback")]
    assert len(list((layout.root / "serving/review/images").iterdir())) == 1  # one image, stored once


def test_feedback_and_admin_are_disabled_without_a_configured_token(layout: Layout) -> None:
    async def go(s: Running):
        return await s.client.post("/v1/admin/reload", headers=AUTH), await s.client.post("/v1/feedback", json={"prediction_id": "x", "wrong": True})

    reload, feedback = run(go, layout, token=None)
    assert reload.status_code == 403 and feedback.status_code == 403


def test_predict_can_require_the_token(layout: Layout) -> None:
    async def go(s: Running):
        return await s.client.post("/v1/predict", **one()), await s.client.post("/v1/predict", headers=AUTH, **one())

    without, with_token = run(go, layout, serve_params(require_token_for_predict=True))
    assert without.status_code == 401 and with_token.status_code == 200


# ---- health, model, metrics, batching --------------------------------------------------------------------


def test_health_ready_model_and_metrics(layout: Layout) -> None:
    async def go(s: Running):
        await s.client.post("/v1/predict", **one())
        return [await s.client.get(u) for u in ("/v1/health", "/v1/ready", "/v1/model", "/metrics")]

    health, ready, model, metrics = run(go, layout)
    assert health.json() == {"status": "ok"} and ready.json()["ready"] is True
    info = model.json()
    assert info["provider"] == "CPUExecutionProvider" and info["classes"] and info["metadata"]["lensmith.classes"]
    text = metrics.text
    for name in ("lensmith_requests_total", "lensmith_request_latency_seconds_bucket", "lensmith_prediction_confidence_bucket",
                 "lensmith_predictions_total", "lensmith_model_info", "lensmith_batch_size_bucket"):
        assert name in text
    assert f'version="{info["version"]}"' in text


def test_ready_is_503_without_a_model(tmp_path: Path) -> None:
    layout = Layout(tmp_path)

    async def go(s: Running):
        return await s.client.get("/v1/ready"), await s.client.post("/v1/predict", **one())

    ready, predict = run(go, layout, source=RegistrySource(layout.models))
    assert ready.status_code == 503 and predict.status_code == 503
    assert predict.json()["error"]["code"] == "no_model"


def test_concurrent_requests_are_micro_batched(layout: Layout) -> None:
    async def go(s: Running):
        responses = await asyncio.gather(*(s.client.post("/v1/predict", **one(jpeg_bytes(i))) for i in range(24)))
        return responses, list(s.service.batcher.batch_sizes)

    responses, sizes = run(go, layout, serve_params(max_batch_size=8, max_wait_ms=50.0))
    assert all(r.status_code == 200 for r in responses)
    assert sum(sizes) == 24 and max(sizes) > 1 and max(sizes) <= 8


# ---- hot reload ------------------------------------------------------------------------------------------


def register_and_promote(layout: Layout) -> str:
    from lensmith.registry import Registry

    meta = json.loads((layout.candidate / "meta.json").read_text())
    metrics, gate = layout.reports / "metrics.json", layout.reports / "gate.json"
    metrics.write_text(json.dumps({"test": {"accuracy": 0.5}}))
    registry = Registry(layout.models)
    champion = registry.aliases()["production"]  # what a gate run now would have compared against
    gate.write_text(json.dumps({"passed": True, "decision": "promote", "champion_version": champion, "candidate": {"weights_sha256": meta["weights_sha256"]}}))
    version = registry.register(layout.candidate, metrics_path=metrics, gate_path=gate, export_path=layout.exported / "export.json")
    registry.promote(version)
    return version


def test_hot_reload_under_load_from_a_registry_promotion(layout: Layout) -> None:
    """Clients keep predicting while production is promoted and rolled back: no failed request."""
    from lensmith.registry import Registry

    first = register_and_promote(layout)

    async def go(s: Running):
        seen: list[tuple[int, str]] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                r = await s.client.post("/v1/predict", **one(jpeg_bytes(i)))
                seen.append((r.status_code, r.json()["predictions"][0]["model_version"] if r.status_code == 200 else r.text))

        tasks = [asyncio.create_task(client(i)) for i in range(4)]
        await asyncio.sleep(0.5)
        second = await asyncio.to_thread(register_and_promote, layout)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if s.service.holder.current.version == second:
                break
        await asyncio.sleep(0.5)
        await asyncio.to_thread(Registry(layout.models).rollback)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if s.service.holder.current.version == first:
                break
        await asyncio.sleep(0.5)
        forced = await s.client.post("/v1/admin/reload", headers=AUTH)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
        return seen, second, forced

    seen, second, forced = run(go, layout, source=RegistrySource(layout.models))
    failures = [s for s in seen if s[0] != 200]
    assert not failures, failures[:3]
    versions = [v for _, v in seen]
    assert first in versions and second in versions
    assert versions[-1] == first  # rolled back
    assert forced.status_code == 200 and forced.json()["model_version"] == first


# ---- the predict fast path: own multipart parsing, inline decoding, background log writer ----------------


MULTIPART_ERRORS = {
    "file sent as a plain field": ({"data": {"file": "not a file"}, "files": {"other": ("a.jpg", b"x", "image/jpeg")}}, 422, "invalid_request"),
    "body not multipart at all": ({"content": b"--x\r\nnope", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "malformed_body"),
    "multipart without a boundary": ({"content": b"data", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_body"),
    "multipart with an empty body": ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "empty_body"),
    "only other fields": ({"data": {"note": "hello"}, "files": {"picture": ("a.jpg", b"x", "image/jpeg")}}, 400, "wrong_field"),
}


@pytest.mark.parametrize("case", list(MULTIPART_ERRORS), ids=list(MULTIPART_ERRORS))
def test_multipart_mistakes_get_a_4xx_json_error(layout: Layout, case: str) -> None:
    kwargs, status, code = MULTIPART_ERRORS[case]

    async def go(s: Running):
        return await s.client.post("/v1/predict", **kwargs)

    response = run(go, layout)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_the_fast_path_and_the_fastapi_route_answer_predict_alike(layout: Layout) -> None:
    """POST /v1/predict is answered ahead of FastAPI's router; mounted under a prefix, the app's route
    answers instead (same predict code). Both must give the same statuses, errors, predictions and metrics."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    cases = {"good": (one(jpeg_bytes(3)), 200, None)} | BAD_INPUTS | MULTIPART_ERRORS
    params = serve_params(max_upload_bytes=200_000, max_images_per_request=4)

    async def main():  # noqa: ANN202
        app = create_app(params, layout.root, PathSource(layout.exported), token=TOKEN)
        outer = Starlette(routes=[Mount("/api", app=app)])
        route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/predict")
        route_app, route_calls = route.app, []

        async def counted(scope, receive, send):  # noqa: ANN001, ANN202 - the FastAPI route's own ASGI app
            route_calls.append(scope["path"])
            await route_app(scope, receive, send)

        route.app = counted
        answers: dict[str, list] = {}
        async with app.router.lifespan_context(app):
            for prefix, asgi in (("", app), ("/api", outer)):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://lensmith") as client:
                    for case, (kwargs, _, _) in cases.items():
                        answers.setdefault(case, []).append(await client.post(f"{prefix}/v1/predict", **kwargs))
                    wrong_method = await client.get(f"{prefix}/v1/predict")
                    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
                # the fast path answered every POST itself; the mounted app's went through the route, except
                # "too large", refused by its Content-Length before any routing
                assert len(route_calls) == (0 if not prefix else len(cases) - 1), (prefix, route_calls)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith") as client:
                metrics = (await client.get("/metrics")).text
        return answers, metrics

    answers, metrics = asyncio.run(main())
    for case, (fast, routed) in answers.items():
        _, status, code = cases[case]
        assert fast.status_code == routed.status_code == status, (case, fast.text, routed.text)
        assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
        if code is not None:
            assert fast.json()["error"] == routed.json()["error"] and fast.json()["error"]["code"] == code, case
    good_fast, good_routed = (r.json()["predictions"][0] for r in answers["good"])
    assert (good_fast["label"], good_fast["top_k"], good_fast["image_sha256"]) == (good_routed["label"], good_routed["top_k"], good_routed["image_sha256"])
    # counted under the route template; the fast path's refusal by Content-Length too (before any routing,
    # the mounted app's is counted under the mount)
    assert 'lensmith_requests_total{endpoint="/v1/predict",status="200"} 2.0' in metrics
    assert 'lensmith_requests_total{endpoint="/v1/predict",status="413"} 1.0' in metrics


def test_openapi_documents_the_predict_body_and_its_bearer_token(layout: Layout) -> None:
    async def go(s: Running):
        return (await s.client.get("/openapi.json")).json()

    operation = run(go, layout)["paths"]["/v1/predict"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(schema["properties"]) == {"file", "files"}
    assert operation["security"] == [{"HTTPBearer": []}]


def test_small_images_are_decoded_inline_and_large_ones_in_the_thread_pool(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve import predict as predict_module

    prepared_in_pool = []
    real = predict_module.run_in_threadpool

    async def spy(fn, *args, **kwargs):  # noqa: ANN001, ANN202
        if fn is predict_module.prepare:
            prepared_in_pool.append(len(args[0]))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(predict_module, "run_in_threadpool", spy)
    big = jpeg_bytes(3, size=(400, 300))  # 120,000 pixels > INLINE_MAX_PIXELS

    async def go(s: Running):
        small = await s.client.post("/v1/predict", **one(jpeg_bytes(3)))
        large = await s.client.post("/v1/predict", **one(big))
        return small, large

    small, large = run(go, layout)
    assert small.status_code == 200 and large.status_code == 200
    assert prepared_in_pool == [1]  # only the large image went to a thread


def test_every_prediction_is_in_the_log_after_shutdown_even_with_a_slow_disk(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.serve.predlog import PredictionLog

    real_write = PredictionLog._write

    def slow_write(self, batch):  # noqa: ANN001, ANN202
        import time

        time.sleep(0.2)
        real_write(self, batch)

    monkeypatch.setattr(PredictionLog, "_write", slow_write)

    async def go(s: Running):
        responses = await asyncio.gather(*(s.client.post("/v1/predict", **one(jpeg_bytes(i))) for i in range(20)))
        return [r.json()["predictions"][0]["id"] for r in responses]

    ids = run(go, layout)  # returns when the service has shut down
    assert sorted(r["id"] for r in read_log(layout.root / "serving/predictions")) == sorted(ids)
