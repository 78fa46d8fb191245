"""The FastAPI app: predict / health / ready / model / feedback / admin reload under /v1, plus /metrics.

`create_app(params, root, source)` builds it; `lensmith serve` runs it under uvicorn. Every error is a
JSON body `{"error": {"code", "message"}}` with a 4xx status for bad input; stack traces stay in the
server log. Requests never name server paths: images are stored under content hashes only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lensmith.errors import ImageRejected, LensmithError
from lensmith.imageio import decode_image
from lensmith.imagestats import image_stats
from lensmith.onnxmodel import softmax
from lensmith.params import ServeParams
from lensmith.procutil import available_cores, cgroup_cpu_limit  # noqa: F401 - re-exported
from lensmith.serve.batching import MicroBatcher
from lensmith.serve.models import ModelHolder, ModelSource, RegistrySource, ServedModel
from lensmith.serve.multipart import MalformedMultipart, Part, boundary_of, parse_form_data
from lensmith.serve.predlog import PredictionLog
from lensmith.serve.review import ReviewQueue
from lensmith.serve.security import bearer_from_header, configured_token, token_matches

log = logging.getLogger("lensmith.serve")

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif"}
RECENT_BYTES_LIMIT = 64 * 1024 * 1024
# Requests whose images are this small are decoded on the event loop (decode + stats + resize of a 128 px
# JPEG is ~0.3 ms; a thread hand-over costs about as much); larger ones in the thread pool, so that a big
# image never holds up the other requests.
INLINE_MAX_PIXELS = 256 * 256  # per image
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 256 * 1024
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


# ---- errors ----------------------------------------------------------------------------------------------


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable code; rendered as {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """The JSON error answer for an HTTP error (ours carry a code; Starlette's and FastAPI's get one)."""
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 400 and message == "There was an error parsing the body":
        code, message = "malformed_body", "the request body is not valid multipart/form-data"
    response = error_response(exc.status_code, code, message)
    if exc.status_code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; the server log has the details")


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"request body exceeds the upload limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies above `limit` bytes: at once from Content-Length, else while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, "too_large", f"request body exceeds the upload limit of {self.limit} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # an HTTPException: FastAPI's form parsing re-raises it as is
            return message

        await self.app(scope, limited_receive, send)


# ---- metrics ---------------------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lensmith_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "lensmith_request_latency_seconds", "Request latency", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.confidence = Histogram(
            "lensmith_prediction_confidence", "Top-1 confidence", registry=self.registry,
            buckets=tuple(np.round(np.linspace(0.1, 1.0, 10), 2)),
        )
        self.predictions = Counter("lensmith_predictions", "Predictions per class", ["label"], registry=self.registry)
        self.review = Counter("lensmith_review_items", "Items put in the review queue", ["reason"], registry=self.registry)
        self.batch = Histogram("lensmith_batch_size", "Images per session run", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.inference = Histogram(
            "lensmith_inference_seconds", "Seconds per session run (one batch)", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.model = Gauge("lensmith_model_info", "The model being served (value 1)", ["version", "variant", "provider"], registry=self.registry)
        self.reloads = Counter("lensmith_model_reloads", "Model reloads", ["result"], registry=self.registry)

    def set_model(self, model: ServedModel) -> None:
        self.model.clear()
        self.model.labels(model.version, model.variant, model.onnx.provider).set(1)


class MetricsMiddleware:
    """Count requests and time them per route template (never per raw path: bounded label values)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if status >= 400:  # with serve.access_log off, the failures still leave a line
                client = scope.get("client") or ("-", 0)
                log.info("%s %s %s from %s", scope.get("method"), scope.get("path"), status, client[0])


# ---- schemas ---------------------------------------------------------------------------------------------


class TopK(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    id: str
    label: str
    confidence: float
    top_k: list[TopK]
    needs_review: bool
    model_version: str
    latency_ms: float
    image_sha256: str


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_version: str
    latency_ms: float


class FeedbackIn(BaseModel):
    prediction_id: str = Field(..., min_length=1, max_length=64)
    label: str | None = Field(None, min_length=1, max_length=200, description="The correct label")
    wrong: bool = Field(False, description="True when the prediction is wrong but the correct label is unknown")


class FeedbackOut(BaseModel):
    review_item: str
    prediction_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorOut} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)}


# ---- state -----------------------------------------------------------------------------------------------


@dataclass
class Remembered:
    prediction: dict[str, Any]
    image: bytes
    ext: str
    classes: list[str]


class RecentPredictions:
    """The last N predictions (with their image bytes) so feedback can queue the image; bounded in bytes too."""

    def __init__(self, limit: int, byte_limit: int = RECENT_BYTES_LIMIT) -> None:
        self.limit, self.byte_limit = limit, byte_limit
        self._items: OrderedDict[str, Remembered] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, key: str, item: Remembered) -> None:
        with self._lock:
            self._items[key] = item
            self._bytes += len(item.image)
            while self._items and (len(self._items) > self.limit or self._bytes > self.byte_limit):
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.image)

    def get(self, key: str) -> Remembered | None:
        with self._lock:
            return self._items.get(key)


@dataclass
class DecodedUpload:
    image: Image.Image
    data: bytes
    sha256: str
    ext: str
    stats: dict[str, float] = field(default_factory=dict)  # imagestats.image_stats, for the prediction log

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def mode(self) -> str:
        return self.image.mode


@dataclass(frozen=True)
class RunOutput:
    """What the inference thread hands back per image: a fresh prediction id and the top-k classes."""

    id: str
    top_k: list[dict[str, Any]]  # [{"label", "probability"}], most probable first


def inference_layout(params: ServeParams, cores: int | None = None) -> tuple[int, int]:
    """(batches run at once, ONNX Runtime intra-op threads per run) for serve.runners, serve.threads and
    serve.providers.

    On CPU, threads=0 means single-threaded runs: a multi-threaded run waits at every operator for its
    slowest thread, and with the event loop and the request threads taking turns on the same cores that
    wait is long (on 2 cores under load, 2-thread runs were slower than 1-thread ones); single-threaded
    runs side by side keep the cores busy and barely depend on the batch size. runners=0 then runs one
    more batch than there are cores: while a runner's answers go out and its clients' next requests come
    in through the event loop, its core would idle; the spare run takes it (bench/serve.py, 2 cores, 16
    clients, one 3-round trial: 2 runs 0.72x of the raw session, 3 runs 0.77x, 4 runs 0.78x; a later one:
    3 runs 0.84x, 4 runs 0.74x). threads=N runs cores // N batches of N threads. GPU providers: one run at
    a time. A runners value > 0 is taken as it is."""
    cores = cores or available_cores()
    if params.providers[:1] != ["CPUExecutionProvider"]:
        return params.runners or 1, params.threads
    if params.threads == 0:
        return params.runners or cores + 1, 1
    return params.runners or max(1, cores // params.threads), params.threads


class Service:
    def __init__(self, params: ServeParams, root: Path, source: ModelSource, token: str | None) -> None:
        self.params = params
        self.token = token
        runners, threads = inference_layout(params)
        self.holder = ModelHolder(source, list(params.providers), params.variant, threads)
        self.batcher = MicroBatcher(self._run, params.max_batch_size, params.max_wait_ms / 1000.0, runners)
        self.predlog = PredictionLog(root / params.log_dir, params.log_rotate_bytes)
        self.queue = ReviewQueue(root / params.review_dir)
        self.recent = RecentPredictions(params.feedback_window)
        self.metrics = Metrics()
        self.batcher.on_batch = self._observe_batch

    def _observe_batch(self, images: int, seconds: float) -> None:
        self.metrics.batch.observe(images)
        self.metrics.inference.observe(seconds)

    def _run(self, model: ServedModel, batch: np.ndarray) -> list[RunOutput]:
        """On an inference thread, for a whole N x H x W x C uint8 batch at once: normalisation, session run,
        softmax, top-k and ids (the event loop then only assembles dicts: no numpy, no urandom per request)."""
        x = model.onnx.preprocessing.normalize(batch.transpose(0, 3, 1, 2))  # the shared preprocessing, batched
        probabilities = softmax(model.onnx.logits(x))
        classes = model.onnx.classes
        k = min(self.params.top_k, len(classes))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(probabilities, order, axis=1)
        ids = os.urandom(16 * len(batch)).hex()
        return [
            RunOutput(ids[32 * i : 32 * (i + 1)], [{"label": classes[c], "probability": p} for c, p in zip(cs, ps)])
            for i, (cs, ps) in enumerate(zip(order.tolist(), top.tolist()))
        ]

    def reload(self, force: bool) -> bool:
        try:
            changed = self.holder.reload(force)
        except LensmithError:
            self.metrics.reloads.labels("failed").inc()
            raise
        if changed and self.holder.current is not None:
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.set_model(self.holder.current)
        return changed

    async def poll_for_new_models(self) -> None:
        while True:
            await asyncio.sleep(self.params.reload_poll_s)
            try:
                await asyncio.to_thread(self.reload, False)
            except LensmithError as exc:
                log.error("hot reload failed, still serving the previous model: %s", exc)
            except Exception:
                log.exception("hot reload crashed, still serving the previous model")

    def require_token(self, credentials: HTTPAuthorizationCredentials | str | None) -> None:
        """`credentials`: FastAPI's HTTPBearer result, or the bearer token itself."""
        if self.token is None:
            raise ApiError(403, "disabled", "this endpoint is disabled: the server has no LENSMITH_API_TOKEN set")
        presented = credentials.credentials if isinstance(credentials, HTTPAuthorizationCredentials) else credentials
        if not token_matches(presented, self.token):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")


class TooBigForInline(Exception):
    """The upload is too large to decode on the event loop: decode it in the thread pool."""


def decode_upload(data: bytes, max_pixels: int, inline_pixels: int | None = None) -> DecodedUpload:
    limit = max_pixels if inline_pixels is None else min(max_pixels, inline_pixels)
    try:
        decoded = decode_image(data, max_pixels=limit)  # the pixel limit is checked on the header, before decoding
    except ImageRejected as exc:
        if exc.reason == "decompression_bomb" and limit < max_pixels:
            raise TooBigForInline from None
        code = {"empty_file": "empty_file", "decompression_bomb": "too_large"}.get(exc.reason, "invalid_image")
        status = 413 if code == "too_large" else 400
        raise ApiError(status, code, f"the upload is not a usable image ({exc.reason}: {exc.detail})") from None
    ext = FORMAT_EXTENSIONS.get(decoded.format, "img")
    return DecodedUpload(decoded.image, data, hashlib.sha256(data).hexdigest(), ext)


def is_image_content_type(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower().startswith("image/")


# ---- the app ---------------------------------------------------------------------------------------------


def create_app(params: ServeParams, root: Path, source: ModelSource, token: str | None = None, *, load: bool = True) -> FastAPI:
    """The service; `token` defaults to $LENSMITH_API_TOKEN. With `load`, the model is loaded at startup."""
    service = Service(params, Path(root), source, token if token is not None else configured_token())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if load and service.holder.current is None:
            try:
                await asyncio.to_thread(service.reload, True)
            except LensmithError as exc:
                log.error("no model loaded at startup (%s); /v1/ready answers 503 until one loads", exc)
        service.batcher.start()
        poller = asyncio.create_task(service.poll_for_new_models())
        try:
            yield
        finally:
            poller.cancel()
            await service.batcher.stop()
            service.predlog.close()

    app = FastAPI(title="Lensmith", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=params.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)

    def current_model() -> ServedModel:
        model = service.holder.current
        if model is None:
            raise ApiError(503, "no_model", f"no model is loaded ({service.holder.last_error or 'not loaded yet'})")
        return model

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ready", responses={503: {"model": ErrorOut}})
    async def ready() -> dict[str, Any]:
        model = current_model()
        return {"ready": True, "model_version": model.version}

    @app.get("/v1/model", responses={503: {"model": ErrorOut}})
    async def model_info() -> dict[str, Any]:
        model = current_model()
        return {
            "version": model.version,
            "variant": model.variant,
            "file": model.file,
            "provider": model.onnx.provider,
            "source": "registry" if isinstance(service.holder.source, RegistrySource) else "path",
            "classes": model.onnx.classes,
            "preprocessing": model.onnx.preprocessing.to_dict(),
            "metadata": model.onnx.metadata,
            "loaded_at": model.loaded_at,
        }

    async def predict_payload(request: Request) -> dict[str, Any]:
        """POST /v1/predict's answer (a `PredictResponse` as a dict); bad requests raise ApiError."""
        started = time.perf_counter()
        if params.require_token_for_predict:
            service.require_token(bearer_from_header(request.headers.get("authorization")))
        uploads = parse_uploads(request.headers.get("content-type", ""), await request.body())
        if len(uploads) > params.max_images_per_request:
            raise ApiError(400, "too_many_images", f"{len(uploads)} images sent; at most {params.max_images_per_request} per request")
        for upload in uploads:
            if not is_image_content_type(upload.content_type):
                raise ApiError(415, "unsupported_media_type", f"content type {upload.content_type!r} is not an image type (image/*)")
        model = current_model()
        datas = [u.data for u in uploads]
        try:  # small images (~0.3 ms of work) here: cheaper than a hand-over to a thread and back
            if len(datas) > INLINE_MAX_IMAGES or sum(len(d) for d in datas) > INLINE_MAX_BYTES:
                raise TooBigForInline
            decoded, inputs = prepare(datas, model, params.max_pixels, INLINE_MAX_PIXELS)
        except TooBigForInline:
            decoded, inputs = await run_in_threadpool(prepare, datas, model, params.max_pixels)
        outputs = await service.batcher.submit(model, inputs)
        latency_ms = (time.perf_counter() - started) * 1000.0
        predictions = build_predictions(outputs, model, params, latency_ms, decoded)
        if any(p["needs_review"] for p in predictions):  # file writes: not on the event loop
            await run_in_threadpool(queue_low_confidence, service, predictions, decoded)
        record(service, predictions, decoded, model)
        return {"predictions": predictions, "model_version": model.version, "latency_ms": latency_ms}

    # The body is parsed by parse_uploads and the token read from the header, not through FastAPI parameters
    # (File() fields and the HTTPBearer dependency cost more per request than the rest of the handler);
    # openapi_extra documents the same request body and security as those parameters would. This route
    # documents the endpoint and answers when the app is mounted under a prefix; otherwise PredictFastPath
    # answers POST /v1/predict with the same predict_payload before FastAPI's routing.
    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=ERRORS,
        openapi_extra={"requestBody": PREDICT_BODY, "security": [{"HTTPBearer": []}]},
    )
    async def predict(request: Request) -> Response:
        return json_response(await predict_payload(request))

    async def predict_endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """POST /v1/predict as a plain ASGI app (what PredictFastPath calls)."""
        try:
            response: Response = json_response(await predict_payload(Request(scope, receive)))
        except StarletteHTTPException as exc:
            response = http_error_response(exc)
        except ClientDisconnect:
            return  # the client left before its body arrived: nobody to answer
        await response(scope, receive, send)

    @app.post("/v1/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS)
    async def feedback(body: FeedbackIn, credentials: Credentials) -> FeedbackOut:
        service.require_token(credentials)
        if (body.label is None) == (not body.wrong):
            raise ApiError(422, "invalid_request", "send either `label` (the correct class) or `wrong: true`, not both or neither")
        remembered = service.recent.get(body.prediction_id)
        if remembered is None:
            raise ApiError(404, "unknown_prediction", f"no recent prediction with id {body.prediction_id!r}")
        if body.label is not None and body.label not in remembered.classes:
            raise ApiError(422, "unknown_label", f"{body.label!r} is not one of the model's classes {remembered.classes}")
        label = body.label if body.label is not None else "wrong"
        item = await run_in_threadpool(
            service.queue.add, image=remembered.image, sha256=remembered.prediction["image_sha256"],
            ext=remembered.ext, reason="feedback", prediction=remembered.prediction, feedback_label=label,
        )
        service.metrics.review.labels("feedback").inc()
        return FeedbackOut(review_item=item, prediction_id=body.prediction_id)

    @app.post("/v1/admin/reload", responses=ERRORS)
    async def admin_reload(credentials: Credentials) -> dict[str, Any]:
        service.require_token(credentials)
        try:
            await asyncio.to_thread(service.reload, True)
        except LensmithError as exc:
            still = service.holder.current.version if service.holder.current else "nothing"
            raise ApiError(409, "reload_failed", f"reload failed, still serving {still}: {exc}") from None
        model = current_model()
        return {"reloaded": True, "model_version": model.version, "variant": model.variant}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    predict_route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/predict")
    fast_endpoint = MetricsMiddleware(BodyLimitMiddleware(predict_endpoint, limit=params.max_upload_bytes), metrics=service.metrics)
    app.add_middleware(PredictFastPath, endpoint=fast_endpoint, route=predict_route)  # outermost of ours
    return app


def json_response(payload: dict[str, Any]) -> Response:
    """A JSON answer serialised by orjson (several times faster than json.dumps for the predictions)."""
    return Response(orjson.dumps(payload), media_type="application/json")


class PredictFastPath:
    """POST /v1/predict straight to its endpoint, past FastAPI's router, exception and dependency layers.

    Measured with uvicorn on this machine (16 keep-alive clients, a 6.5 KB body): a FastAPI route cost
    0.25-0.27 ms of server CPU per request, a plain ASGI endpoint 0.09-0.10 ms; at ~200 predictions/s on
    2 cores that difference is ~2 % of the service's throughput. The endpoint carries its own metrics and
    body limit; errors and 500s look exactly as on the other routes (the app's outer error middleware
    still wraps it). Every other request goes to `app`."""

    def __init__(self, app: Any, endpoint: Any, route: Any) -> None:
        self.app = app
        self.endpoint = endpoint
        self.route = route

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/predict" and scope["method"] == "POST":
            scope["route"] = self.route  # the metrics' endpoint label, as if routed
            return await self.endpoint(scope, receive, send)
        await self.app(scope, receive, send)


BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}
PREDICT_BODY = {  # what FastAPI generated for the optional File() parameters `file` and `files`
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "title": "PredictUpload",
                "properties": {
                    "file": {"anyOf": [BINARY, {"type": "null"}], "title": "File", "description": "One image"},
                    "files": {"anyOf": [{"type": "array", "items": BINARY}, {"type": "null"}], "title": "Files", "description": "Several images"},
                },
            }
        }
    },
}


def parse_uploads(content_type: str, body: bytes) -> list[Part]:
    """The images of a predict request: the multipart part `file` and every part `files`, in order.
    `body` is bounded by BodyLimitMiddleware (413 beyond serve.max_upload_bytes).

    Empty body vs. a multipart body with other fields vs. no multipart at all: each error says what to send."""
    boundary = boundary_of(content_type)
    if boundary is None:
        if content_type.lower().startswith("multipart/form-data"):
            raise ApiError(400, "malformed_body", "the request body is not valid multipart/form-data (no usable boundary)")
        if not body:
            raise ApiError(400, "empty_body", "empty request: send images as multipart/form-data field 'file' or 'files'")
        raise ApiError(415, "unsupported_media_type", "send images as multipart/form-data (field 'file' or 'files')")
    if not body or body.isspace():
        raise ApiError(400, "empty_body", "no image in the request: use multipart field 'file' (one) or 'files' (several)")
    try:
        parts = parse_form_data(body, boundary)
    except MalformedMultipart as exc:
        raise ApiError(400, "malformed_body", f"the request body is not valid multipart/form-data ({exc})") from None
    images = [p for p in parts if p.name in ("file", "files")]
    for part in images:
        if part.filename is None:
            raise ApiError(422, "invalid_request", f"multipart field {part.name!r} must be a file (a part with a filename)")
    uploads = [p for p in images if p.name == "file"][-1:] + [p for p in images if p.name == "files"]
    if not uploads:
        fields = sorted({p.name for p in parts})
        if not fields:
            raise ApiError(400, "empty_body", "no image in the request: use multipart field 'file' (one) or 'files' (several)")
        raise ApiError(400, "wrong_field", f"unexpected multipart field(s) {fields[:5]}: use 'file' (one image) or 'files' (several)")
    return uploads


def prepare(
    datas: list[bytes], model: ServedModel, max_pixels: int, inline_pixels: int | None = None
) -> tuple[list[DecodedUpload], np.ndarray]:
    """Decode every upload (all must be images): the decoded uploads with their statistics, and the images
    resized and cropped by the model's preprocessing as N x H x W x C uint8 (normalised per batch later).
    With `inline_pixels`, raises TooBigForInline (before decoding) for an image with more pixels than that."""
    decoded = [decode_upload(data, max_pixels, inline_pixels) for data in datas]
    for d in decoded:
        d.stats = image_stats(d.image)  # the same full-image statistics as the drift reference's
    return decoded, np.stack([model.onnx.preprocessing.to_uint8(d.image) for d in decoded])


def build_predictions(
    outputs: list[RunOutput], model: ServedModel, params: ServeParams, latency_ms: float, decoded: list[DecodedUpload]
) -> list[dict[str, Any]]:
    """One `Prediction`-shaped dict per image."""
    return [
        {
            "id": out.id,
            "label": out.top_k[0]["label"],
            "confidence": out.top_k[0]["probability"],
            "top_k": out.top_k,
            "needs_review": out.top_k[0]["probability"] < params.review_threshold,
            "model_version": model.version,
            "latency_ms": latency_ms,
            "image_sha256": upload.sha256,
        }
        for out, upload in zip(outputs, decoded)
    ]


def queue_low_confidence(service: Service, predictions: list[dict[str, Any]], decoded: list[DecodedUpload]) -> None:
    for prediction, upload in zip(predictions, decoded):
        if prediction["needs_review"]:
            service.queue.add(image=upload.data, sha256=upload.sha256, ext=upload.ext, reason="low_confidence", prediction=prediction)
            service.metrics.review.labels("low_confidence").inc()


def record(service: Service, predictions: list[dict[str, Any]], decoded: list[DecodedUpload], model: ServedModel) -> None:
    """The flywheel: log every prediction with its image stats and remember it for feedback.

    Runs on the event loop and does no I/O: the prediction log's writer thread encodes and writes."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    classes = list(model.onnx.classes)
    records = []
    for prediction, upload in zip(predictions, decoded):
        service.metrics.predictions.labels(prediction["label"]).inc()
        service.metrics.confidence.observe(prediction["confidence"])
        records.append(
            {
                "id": prediction["id"],
                "time": stamp,
                "model_version": model.version,
                "variant": model.variant,
                "label": prediction["label"],
                "confidence": prediction["confidence"],
                "top_k": prediction["top_k"],
                "needs_review": prediction["needs_review"],
                "image_sha256": upload.sha256,
                "width": upload.width,
                "height": upload.height,
                "mode": upload.mode,
                **upload.stats,
            }
        )
        service.recent.add(prediction["id"], Remembered(prediction=prediction, image=upload.data, ext=upload.ext, classes=classes))
    service.predlog.append(records)
