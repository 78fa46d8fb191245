"""POST /v1/predict: the multipart uploads to decoded images (on the event loop when small, else in the
thread pool), one micro-batched inference, the predictions, the review queue and the prediction log; and
the fast path that answers it before FastAPI's routing. Images are stored under content hashes only."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lensmith.errors import ImageRejected
from lensmith.imageio import decode_image
from lensmith.imagestats import image_stats
from lensmith.params import ServeParams
from lensmith.serve.apierrors import ApiError, http_error_response
from lensmith.serve.models import ServedModel
from lensmith.serve.multipart import MalformedMultipart, Part, boundary_of, parse_form_data
from lensmith.serve.security import bearer_from_header
from lensmith.serve.service import Remembered, RunOutput, Service

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp", "GIF": "gif"}
# Requests whose images are this small are decoded on the event loop (decode + stats + resize of a 128 px
# JPEG is ~0.3 ms; a thread hand-over costs about as much); larger ones in the thread pool, so that a big
# image never holds up the other requests.
INLINE_MAX_PIXELS = 256 * 256  # per image
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 256 * 1024


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
            service.queue.offer(image=upload.data, sha256=upload.sha256, ext=upload.ext, reason="low_confidence", prediction=prediction)
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


async def predict_payload(service: Service, request: Request) -> dict[str, Any]:
    """POST /v1/predict's answer (a `PredictResponse` as a dict); bad requests raise ApiError."""
    started = time.perf_counter()
    params = service.params
    if params.require_token_for_predict:
        service.require_token(bearer_from_header(request.headers.get("authorization")))
    uploads = parse_uploads(request.headers.get("content-type", ""), await request.body())
    if len(uploads) > params.max_images_per_request:
        raise ApiError(400, "too_many_images", f"{len(uploads)} images sent; at most {params.max_images_per_request} per request")
    for upload in uploads:
        if not is_image_content_type(upload.content_type):
            raise ApiError(415, "unsupported_media_type", f"content type {upload.content_type!r} is not an image type (image/*)")
    model = service.require_model()
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


def json_response(payload: dict[str, Any]) -> Response:
    """A JSON answer serialised by orjson (several times faster than json.dumps for the predictions)."""
    return Response(orjson.dumps(payload), media_type="application/json")


class PredictEndpoint:
    """POST /v1/predict as a plain ASGI app (what PredictFastPath calls)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            response: Response = json_response(await predict_payload(self.service, Request(scope, receive)))
        except StarletteHTTPException as exc:
            response = http_error_response(exc)
        except ClientDisconnect:
            return  # the client left before its body arrived: nobody to answer
        await response(scope, receive, send)


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
