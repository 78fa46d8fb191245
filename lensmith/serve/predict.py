"""POST /v1/predict: the multipart uploads to decoded images (on the event loop when small, else in the
thread pool, a bounded number at once), one micro-batched inference, the predictions, the review queue and
the prediction log; and the fast path that answers it before FastAPI's routing. Images are stored under
content hashes only.

Hostile uploads are bounded before any pixel is decoded: only the supported formats are parsed (415
otherwise), and every image's header is read first, so an image over serve.max_pixels or a request over
serve.max_request_pixels is refused (413) from the headers. A large image is decoded reduced to about the
model's input size (`DECODE_MARGIN`), its statistics measured on the reduced image, and no full-size pixels
outlive the decode. At most serve.max_concurrent_decodes uploads are decoded at once. Overload is answered
503 with Retry-After: when admission refuses the request (lensmith.serve.admission: its expected wait for
inference over serve.max_queue_wait_ms, or serve.max_queue requests queued already: decoding, or waiting for
a decode slot or a session run; checked by the fast path before the body is read and again before decoding),
and when a request misses its deadline (serve.request_timeout_s).

The images' context (site, line, camera...: lensmith.serve.context) comes from the non-file multipart fields
and the X-Lensmith-Context-* headers, is checked before decoding, and goes with every prediction: the answer,
the prediction log, the review queue and the remembered prediction that feedback queues."""

from __future__ import annotations

import asyncio
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
from lensmith.imageio import decode_opened, open_image
from lensmith.imagestats import image_stats
from lensmith.params import ServeParams
from lensmith.serve.apierrors import ApiError, http_error_response
from lensmith.serve.batching import QueueFull
from lensmith.serve.context import context_headers, request_context
from lensmith.serve.models import ServedModel
from lensmith.serve.multipart import MalformedMultipart, Part, boundary_of, parse_form_data
from lensmith.serve.security import bearer_from_header
from lensmith.serve.service import Remembered, RunOutput, Service, overloaded, refusal_message

PREDICT_PATH = "/v1/predict"
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}
# Requests whose images are this small are decoded on the event loop (decode + stats + resize of a 128 px
# JPEG is ~0.3 ms; a thread hand-over costs about as much); larger ones in the thread pool, so that a big
# image never holds up the other requests.
INLINE_MAX_PIXELS = 256 * 256  # per image
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 256 * 1024
# A large upload is decoded reduced by an integer factor that keeps its short side at least this many
# times the model's resize, so the model's own resize is still a downscale from at least twice its size
# (an image with a short side under 4x the resize is decoded at full size: predictions unchanged).
DECODE_MARGIN = 2


@dataclass
class DecodedUpload:
    data: bytes
    sha256: str
    ext: str
    width: int  # of the image in the file (orientation applied), even when it was decoded reduced
    height: int
    mode: str  # L or RGB, as decoded
    reduction: int = 1  # the statistics were measured on the image reduced by this factor
    stats: dict[str, float] = field(default_factory=dict)  # imagestats.image_stats, for the prediction log


def rejection_error(exc: ImageRejected) -> ApiError:
    """The API error for an upload that is not a usable image."""
    if exc.reason == "unsupported_format":
        return ApiError(415, "unsupported_format", f"the upload's image format is not accepted: {exc.detail}")
    code = {"empty_file": "empty_file", "decompression_bomb": "too_large"}.get(exc.reason, "invalid_image")
    status = 413 if code == "too_large" else 400
    return ApiError(status, code, f"the upload is not a usable image ({exc.reason}: {exc.detail})")


def read_headers(datas: list[bytes], params: ServeParams) -> list[Image.Image]:
    """Every upload opened (header read, nothing decoded), within serve.max_pixels per image and
    serve.max_request_pixels together: the limits are enforced before any image of the request is decoded."""
    opened, total = [], 0
    for i, data in enumerate(datas, 1):
        try:
            img = open_image(data)
        except ImageRejected as exc:
            raise rejection_error(exc) from None
        width, height = img.size
        if width * height > params.max_pixels:
            raise ApiError(413, "too_large", f"image {i} is {width}x{height} = {width * height} pixels; at most {params.max_pixels} per image (serve.max_pixels)")
        total += width * height
        opened.append(img)
    if total > params.max_request_pixels:
        raise ApiError(
            413, "too_large", f"the request's images hold {total} pixels together; at most {params.max_request_pixels} per request (serve.max_request_pixels)"
        )
    return opened


def decode_upload(data: bytes, img: Image.Image, model: ServedModel, max_pixels: int) -> tuple[DecodedUpload, np.ndarray]:
    """One opened upload -> (what the log and review queue keep: bytes, hash, size, statistics; the model's
    input as H x W x C uint8). The decoded image itself is dropped here."""
    pre = model.onnx.preprocessing
    try:
        decoded = decode_opened(img, max_pixels=max_pixels, min_short_side=DECODE_MARGIN * pre.resize)
    except ImageRejected as exc:
        raise rejection_error(exc) from None
    width, height = decoded.original_size
    upload = DecodedUpload(
        data, hashlib.sha256(data).hexdigest(), FORMAT_EXTENSIONS.get(decoded.format, "img"), width, height,
        decoded.image.mode, decoded.reduction, image_stats(decoded.image),  # the statistics the drift reference holds
    )
    return upload, pre.to_uint8(decoded.image)


def is_image_content_type(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower().startswith("image/")


@dataclass(frozen=True)
class PredictForm:
    uploads: list[Part]  # the images: the part `file` and every part `files`, in order
    fields: list[Part]  # every other non-file part: the images' context (lensmith.serve.context)


def parse_form(content_type: str, body: bytes) -> PredictForm:
    """The images of a predict request (the multipart part `file` and every part `files`, in order) and its
    other non-file fields. `body` is bounded by BodyLimitMiddleware (413 beyond serve.max_upload_bytes).

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
    return PredictForm(uploads, [p for p in parts if p.filename is None and p.name not in ("file", "files")])


def prepare(
    datas: list[bytes], opened: list[Image.Image], model: ServedModel, max_pixels: int
) -> tuple[list[DecodedUpload], np.ndarray]:
    """Decode every opened upload: the decoded uploads with their statistics, and the images resized and
    cropped by the model's preprocessing as N x H x W x C uint8 (normalised per batch later)."""
    results = [decode_upload(data, img, model, max_pixels) for data, img in zip(datas, opened)]
    return [r[0] for r in results], np.stack([r[1] for r in results])


def decodes_inline(datas: list[bytes], opened: list[Image.Image]) -> bool:
    """Whether the request's images are small enough to decode on the event loop."""
    return (
        len(datas) <= INLINE_MAX_IMAGES
        and sum(len(d) for d in datas) <= INLINE_MAX_BYTES
        and all(img.width * img.height <= INLINE_MAX_PIXELS for img in opened)
    )


async def prepare_in_pool(service: Service, datas: list[bytes], opened: list[Image.Image], model: ServedModel) -> tuple[list[DecodedUpload], np.ndarray]:
    """`prepare` in the thread pool once a decode slot is free. The slot is held until the decode has
    finished, even when the request stops waiting for it (deadline, client gone): at most
    serve.max_concurrent_decodes decodes ever run at once."""
    slots = service.decode_slots
    assert slots is not None, "Service.start() was not called"
    await slots.acquire()
    task = asyncio.ensure_future(run_in_threadpool(prepare, datas, opened, model, service.params.max_pixels))

    def done(t: asyncio.Future[Any]) -> None:
        slots.release()
        if not t.cancelled():
            t.exception()  # retrieved: a request that gave up leaves no "exception never retrieved" warning

    task.add_done_callback(done)
    return await asyncio.shield(task)


def build_predictions(
    outputs: list[RunOutput], model: ServedModel, params: ServeParams, latency_ms: float, decoded: list[DecodedUpload],
    context: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One `Prediction`-shaped dict per image; every one carries the request's `context` (None: none sent)."""
    return [
        {
            "id": out.id,
            "label": out.top_k[0]["label"],
            "confidence": out.top_k[0]["probability"],
            "top_k": out.top_k,
            "decision": out.decision,
            "defect_score": out.defect_score,
            "needs_review": out.decision == "review" or out.top_k[0]["probability"] < params.review_threshold,
            "model_version": model.version,
            "latency_ms": latency_ms,
            "image_sha256": upload.sha256,
            "context": context,
        }
        for out, upload in zip(outputs, decoded)
    ]


def queue_low_confidence(service: Service, predictions: list[dict[str, Any]], decoded: list[DecodedUpload]) -> None:
    for prediction, upload in zip(predictions, decoded):
        if prediction["needs_review"]:
            reason = "review_band" if prediction["decision"] == "review" else "low_confidence"
            service.queue.offer(
                image=upload.data, sha256=upload.sha256, ext=upload.ext, reason=reason, prediction=prediction, context=prediction["context"]
            )
            service.metrics.review.labels(reason).inc()


def record(service: Service, predictions: list[dict[str, Any]], decoded: list[DecodedUpload], model: ServedModel) -> None:
    """The flywheel: log every prediction with its image stats and remember it for feedback.

    Runs on the event loop and does no I/O: the prediction log's writer thread encodes and writes."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    classes = list(model.onnx.classes)
    positive = model.rule.positive_classes if model.rule is not None and model.rule.kind == "threshold" else ()
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
                "decision": prediction["decision"],
                "defect_score": prediction["defect_score"],
                "needs_review": prediction["needs_review"],
                "image_sha256": upload.sha256,
                "width": upload.width,
                "height": upload.height,
                "mode": upload.mode,
                "decode_reduction": upload.reduction,
                **upload.stats,
                "context": prediction["context"],
            }
        )
        service.recent.add(prediction["id"], Remembered(
            prediction=prediction, image=upload.data, ext=upload.ext, classes=classes, positive_classes=positive))
    service.predlog.append(records)


async def predict_payload(service: Service, request: Request) -> dict[str, Any]:
    """POST /v1/predict's answer (a `PredictResponse` as a dict); bad requests raise ApiError, overload 503."""
    started = time.perf_counter()  # admitted at about this time too (the fast path refused it or let it through)
    params = service.params
    if params.require_token_for_predict:
        service.require_token(bearer_from_header(request.headers.get("authorization")))
    service.check_queue()  # the cheapest answer under overload: before the body is even read
    reading = True
    try:
        async with asyncio.timeout(params.request_timeout_s):
            body = await request.body()
            reading = False
            model, decoded, outputs, context = await infer(
                service, request.headers.get("content-type", ""), body, context_headers(request.scope["headers"]), admitted=started
            )
    except TimeoutError:
        if reading:
            service.metrics.rejected.labels("body_timeout").inc()
            raise ApiError(408, "request_timeout", f"the request body did not arrive within {params.request_timeout_s} s (serve.request_timeout_s)") from None
        service.metrics.rejected.labels("deadline").inc()
        raise overloaded(f"no answer within {params.request_timeout_s} s (serve.request_timeout_s): the service is overloaded; retry shortly") from None
    latency_ms = (time.perf_counter() - started) * 1000.0
    predictions = build_predictions(outputs, model, params, latency_ms, decoded, context)
    if any(p["needs_review"] for p in predictions):  # file writes: not on the event loop
        await run_in_threadpool(queue_low_confidence, service, predictions, decoded)
    record(service, predictions, decoded, model)
    return {"predictions": predictions, "model_version": model.version, "latency_ms": latency_ms}


async def infer(
    service: Service, content_type: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None, admitted: float | None = None,
) -> tuple[ServedModel, list[DecodedUpload], list[RunOutput], dict[str, str] | None]:
    """A request body's uploads checked (headers first), decoded and run in a micro-batch; with the request's
    context, from its fields and its X-Lensmith-Context-* `headers` (lensmith.serve.context.context_headers).
    `admitted`: when the request was admitted (time.perf_counter()), for lensmith_queue_wait_seconds."""
    params = service.params
    form = parse_form(content_type, body)
    uploads = form.uploads
    if len(uploads) > params.max_images_per_request:
        raise ApiError(400, "too_many_images", f"{len(uploads)} images sent; at most {params.max_images_per_request} per request")
    for upload in uploads:
        if not is_image_content_type(upload.content_type):
            raise ApiError(415, "unsupported_media_type", f"content type {upload.content_type!r} is not an image type (image/*)")
    model = service.require_model()
    context = request_context(form.fields, headers or [], model.metadata_columns, model.version, params)
    datas = [u.data for u in uploads]
    opened = read_headers(datas, params)  # 413 / 415 / 400 before any decoding
    service.check_queue()
    service.preparing += 1
    service.preparing_images += len(datas)
    try:
        if decodes_inline(datas, opened):  # small images (~0.3 ms of work): cheaper than a hand-over to a thread and back
            decoded, inputs = prepare(datas, opened, model, params.max_pixels)
        else:
            decoded, inputs = await prepare_in_pool(service, datas, opened, model)
    finally:
        service.preparing -= 1
        service.preparing_images -= len(datas)
    try:
        outputs = await service.batcher.submit(model, inputs, since=admitted)
    except QueueFull:  # not expected (admitted above); the batcher keeps its own bound all the same
        service.metrics.rejected_by_reason["queue_full"].inc()
        raise overloaded(f"{service.batcher.waiting} requests are waiting for inference (serve.max_queue); retry shortly") from None
    return model, decoded, outputs, context


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    """A JSON answer serialised by orjson (several times faster than json.dumps for the predictions)."""
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


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


async def send_json(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A complete JSON answer straight through ASGI `send` (no Response object, no middleware)."""
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


async def refuse_if_overloaded(service: Service, scope: dict[str, Any], send: Any) -> bool:
    """Answer 503 overloaded now, before anything of the request is read, when admission refuses it (the same
    answer as `Service.check_queue`'s); False when it is admitted (or needs its token checked first)."""
    if service.params.require_token_for_predict:  # an unauthenticated client gets its 401 first, from the endpoint
        return False
    started = time.perf_counter()
    verdict = service.admit()
    if verdict.admitted:
        return False
    error = overloaded(refusal_message(verdict, service.queued))
    body = orjson.dumps({"error": {"code": error.code, "message": error.detail}})
    await send_json(send, 503, body, [(name.lower().encode(), value.encode()) for name, value in (error.headers or {}).items()])
    service.metrics.count_request(scope, PREDICT_PATH, 503, time.perf_counter() - started)
    return True


class PredictFastPath:
    """POST /v1/predict straight to its endpoint, past FastAPI's router, exception and dependency layers.

    Measured with uvicorn on this machine (16 keep-alive clients, a 6.5 KB body): a FastAPI route cost
    0.25-0.27 ms of server CPU per request, a plain ASGI endpoint 0.09-0.10 ms; at ~200 predictions/s on
    2 cores that difference is ~2 % of the service's throughput. The endpoint carries its own metrics and
    body limit; errors and 500s look exactly as on the other routes (the app's outer error middleware
    still wraps it). Every other request goes to `app`.

    With `service`, a request that admission refuses is answered 503 here, before its body is read and
    before any middleware: under overload most requests are refused, and every bit of event-loop time they
    take delays the admitted ones (the body, already received or not, is discarded by the server, and the
    connection stays open for the client's next request)."""

    def __init__(self, app: Any, endpoint: Any, route: Any, service: Service | None = None) -> None:
        self.app = app
        self.endpoint = endpoint
        self.route = route
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == PREDICT_PATH and scope["method"] == "POST":
            scope["route"] = self.route  # the metrics' endpoint label, as if routed
            if self.service is not None and await refuse_if_overloaded(self.service, scope, send):
                return
            return await self.endpoint(scope, receive, send)
        await self.app(scope, receive, send)
