"""The FastAPI app: predict / health / ready / model / feedback / admin reload under /v1, plus /metrics.

`create_app(params, root, source)` builds it; `lensmith serve` runs it under uvicorn. Every error is a
JSON body `{"error": {"code", "message"}}` with a 4xx status for bad input; stack traces stay in the
server log. Requests never name server paths: images are stored under content hashes only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lensmith.errors import LensmithError
from lensmith.imageio import ImageRejected, decode_image
from lensmith.imagestats import image_stats
from lensmith.onnxmodel import softmax
from lensmith.params import ServeParams
from lensmith.serve.batching import MicroBatcher
from lensmith.serve.models import ModelHolder, ModelSource, RegistrySource, ServedModel
from lensmith.serve.predlog import PredictionLog
from lensmith.serve.review import ReviewQueue
from lensmith.serve.security import configured_token, token_matches

log = logging.getLogger("lensmith.serve")

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif"}
RECENT_BYTES_LIMIT = 64 * 1024 * 1024
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            code, message = "malformed_body", "the request body is not valid multipart/form-data"
        response = error_response(exc.status_code, code, message)
        if exc.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

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


class Service:
    def __init__(self, params: ServeParams, root: Path, source: ModelSource, token: str | None) -> None:
        self.params = params
        self.token = token
        self.holder = ModelHolder(source, list(params.providers), params.variant, params.threads)
        self.batcher = MicroBatcher(self._run, params.max_batch_size, params.max_wait_ms / 1000.0)
        self.predlog = PredictionLog(root / params.log_dir, params.log_rotate_bytes)
        self.queue = ReviewQueue(root / params.review_dir)
        self.recent = RecentPredictions(params.feedback_window)
        self.metrics = Metrics()
        self.batcher.on_batch = self.metrics.batch.observe

    @staticmethod
    def _run(model: ServedModel, batch: np.ndarray) -> np.ndarray:
        return model.onnx.logits(batch)

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

    def require_token(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            raise ApiError(403, "disabled", "this endpoint is disabled: the server has no LENSMITH_API_TOKEN set")
        presented = credentials.credentials if credentials is not None else None
        if not token_matches(presented, self.token):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")


def decode_upload(data: bytes, max_pixels: int) -> DecodedUpload:
    try:
        decoded = decode_image(data, max_pixels=max_pixels)
    except ImageRejected as exc:
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

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(
        request: Request,
        credentials: Credentials,
        file: Annotated[UploadFile | None, File(description="One image")] = None,
        files: Annotated[list[UploadFile] | None, File(description="Several images")] = None,
    ) -> PredictResponse:
        started = time.perf_counter()
        if params.require_token_for_predict:
            service.require_token(credentials)
        uploads = ([file] if file is not None else []) + list(files or [])
        if not uploads:
            raise await missing_upload_error(request)
        if len(uploads) > params.max_images_per_request:
            raise ApiError(400, "too_many_images", f"{len(uploads)} images sent; at most {params.max_images_per_request} per request")
        for upload in uploads:
            if not is_image_content_type(upload.content_type):
                raise ApiError(415, "unsupported_media_type", f"content type {upload.content_type!r} is not an image type (image/*)")
        model = current_model()
        datas = [await upload.read() for upload in uploads]
        decoded, inputs = await run_in_threadpool(prepare, datas, model, params.max_pixels)
        logits = await service.batcher.submit(model, inputs)
        latency_ms = (time.perf_counter() - started) * 1000.0
        predictions = build_predictions(softmax(logits), model, params, latency_ms)
        await run_in_threadpool(record, service, predictions, decoded, model)
        return PredictResponse(predictions=predictions, model_version=model.version, latency_ms=latency_ms)

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

    return app


async def missing_upload_error(request: Request) -> ApiError:
    """Empty body vs. a multipart body with other fields vs. no multipart at all: each says what to send."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        if not await request.body():
            return ApiError(400, "empty_body", "empty request: send images as multipart/form-data field 'file' or 'files'")
        return ApiError(415, "unsupported_media_type", "send images as multipart/form-data (field 'file' or 'files')")
    form = await request.form()
    fields = sorted(set(form.keys()))
    if not fields:
        return ApiError(400, "empty_body", "no image in the request: use multipart field 'file' (one) or 'files' (several)")
    return ApiError(400, "wrong_field", f"unexpected multipart field(s) {fields[:5]}: use 'file' (one image) or 'files' (several)")


def prepare(datas: list[bytes], model: ServedModel, max_pixels: int) -> tuple[list[DecodedUpload], np.ndarray]:
    """Decode every upload (all must be images) and build the model's input batch (shared preprocessing)."""
    decoded = [decode_upload(data, max_pixels) for data in datas]
    return decoded, model.onnx.preprocessing.batch([d.image for d in decoded])


def build_predictions(probabilities: np.ndarray, model: ServedModel, params: ServeParams, latency_ms: float) -> list[Prediction]:
    classes = model.onnx.classes
    k = min(params.top_k, len(classes))
    out = []
    for row in probabilities:
        order = np.argsort(-row)[:k]
        confidence = float(row[order[0]])
        out.append(
            Prediction(
                id=uuid.uuid4().hex,
                label=classes[order[0]],
                confidence=confidence,
                top_k=[TopK(label=classes[i], probability=float(row[i])) for i in order],
                needs_review=confidence < params.review_threshold,
                model_version=model.version,
                latency_ms=latency_ms,
                image_sha256="",
            )
        )
    return out


def record(service: Service, predictions: list[Prediction], decoded: list[DecodedUpload], model: ServedModel) -> None:
    """The flywheel: log every prediction with its image stats, queue low-confidence ones, remember all for feedback."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    records = []
    for prediction, upload in zip(predictions, decoded):
        prediction.image_sha256 = upload.sha256
        data = prediction.model_dump()
        service.metrics.predictions.labels(prediction.label).inc()
        service.metrics.confidence.observe(prediction.confidence)
        records.append(
            {
                "id": prediction.id,
                "time": now,
                "model_version": model.version,
                "variant": model.variant,
                "label": prediction.label,
                "confidence": prediction.confidence,
                "top_k": [t.model_dump() for t in prediction.top_k],
                "needs_review": prediction.needs_review,
                "image_sha256": upload.sha256,
                "width": upload.image.width,
                "height": upload.image.height,
                "mode": upload.image.mode,
                **image_stats(upload.image),
            }
        )
        if prediction.needs_review:
            service.queue.add(image=upload.data, sha256=upload.sha256, ext=upload.ext, reason="low_confidence", prediction=data)
            service.metrics.review.labels("low_confidence").inc()
        service.recent.add(prediction.id, Remembered(prediction=data, image=upload.data, ext=upload.ext, classes=list(model.onnx.classes)))
    service.predlog.append(records)
