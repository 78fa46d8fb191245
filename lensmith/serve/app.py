"""The FastAPI app: predict / health / ready / model / feedback / admin reload under /v1, plus /metrics.

`create_app(params, root, source)` wires the routes and middleware around a `Service`; `lensmith serve`
runs it under uvicorn. Errors: lensmith.serve.apierrors; predict: lensmith.serve.predict.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lensmith.errors import LensmithError
from lensmith.livequality import feedback_outcome
from lensmith.params import ServeParams
from lensmith.serve.apierrors import ApiError, BodyLimitMiddleware, install_error_handlers, loggable
from lensmith.serve.metrics import MetricsMiddleware
from lensmith.serve.models import ModelSource, RegistrySource
from lensmith.serve.gcwatch import GcPauses
from lensmith.serve.predict import PredictEndpoint, PredictFastPath, json_response, predict_payload
from lensmith.serve.review import item_for_prediction
from lensmith.serve.schemas import ERRORS, PREDICT_BODY, ErrorOut, FeedbackIn, FeedbackOut, PredictResponse
from lensmith.serve.security import configured_token
from lensmith.serve.service import RECENT_BYTES_LIMIT, Service

log = logging.getLogger("lensmith.serve")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


def not_remembered_message(prediction_id: str, window: int, queued: dict[str, Any] | None) -> str:
    """Why feedback cannot be taken for a prediction the service does not remember, and what to do instead."""
    head = (
        f"prediction {loggable(prediction_id, 64)!r} is not remembered: the service keeps only its last {window} predictions "
        f"(serve.feedback_window; at most {RECENT_BYTES_LIMIT // 2**20} MiB of their images), in memory, and forgets them when it restarts"
    )
    if queued is None:
        return head + "; the review queue holds no item for it (images are queued at prediction time only when they need review)"
    return (
        f"{head}; its image is in the review queue as item {queued.get('item_id')} (reason {queued.get('reason')}): "
        "correct it there with `lensmith review export` and `lensmith review import`"
    )


def create_app(
    params: ServeParams, root: Path, source: ModelSource, token: str | None = None, *, load: bool = True,
    quality_floors: dict[str, float] | None = None,
) -> FastAPI:
    """The service; `token` defaults to $LENSMITH_API_TOKEN. With `load`, the model is loaded at startup.
    `quality_floors`: the gate's floors, exported beside the live figures for alert rules."""
    service = Service(params, Path(root), source, token if token is not None else configured_token())
    service.metrics.set_quality_floors(quality_floors or {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if load and service.holder.current is None:
            try:
                await asyncio.to_thread(service.reload, True)
            except LensmithError as exc:
                log.error("no model loaded at startup (%s); /v1/ready answers 503 until one loads", exc)
        service.start()
        pauses = GcPauses(service.metrics.registry)
        pauses.install()
        poller = asyncio.create_task(service.poll_for_new_models())
        try:
            yield
        finally:
            pauses.remove()
            poller.cancel()
            await service.batcher.stop()
            service.predlog.close()

    app = FastAPI(title="Lensmith", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=params.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ready", responses={503: {"model": ErrorOut}})
    async def ready() -> Response:
        """200 while the newest model of the source serves; 503 `no_model`, or 503 `degraded` while an older
        model serves because the newest failed to load or warm up (predict still answers, on the older one)."""
        status, body = service.readiness()
        return json_response(body, status)

    @app.get("/v1/model", responses={503: {"model": ErrorOut}})
    async def model_info() -> dict[str, Any]:
        model = service.require_model()
        return {
            "version": model.version,
            "variant": model.variant,
            "file": model.file,
            "provider": model.onnx.provider,
            "source": "registry" if isinstance(service.holder.source, RegistrySource) else "path",
            "classes": model.onnx.classes,
            "preprocessing": model.onnx.preprocessing.to_dict(),
            "decision_rule": model.rule.as_dict() if model.rule is not None else None,
            "metadata": model.onnx.metadata,
            "context_columns": list(model.metadata_columns),
            "loaded_at": model.loaded_at,
            "degraded": service.holder.degraded,
        }

    # The body is parsed by parse_form and the token read from the header, not through FastAPI parameters
    # (File() fields and the HTTPBearer dependency cost more per request than the rest of the handler);
    # openapi_extra documents the same request body and security as those parameters would. This route
    # documents the endpoint and answers when the app is mounted under a prefix; otherwise PredictFastPath
    # answers POST /v1/predict with the same predict_payload before FastAPI's routing.
    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=ERRORS,
        openapi_extra={"requestBody": PREDICT_BODY, "security": [{"HTTPBearer": []}]},
    )
    async def predict(request: Request) -> Response:
        return json_response(await predict_payload(service, request))

    @app.post("/v1/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS)
    async def feedback(body: FeedbackIn, credentials: Credentials) -> FeedbackOut:
        service.require_token(credentials)
        if (body.label is None) == (not body.wrong):
            raise ApiError(422, "invalid_request", "send either `label` (the correct class) or `wrong: true`, not both or neither")
        remembered = service.recent.get(body.prediction_id)
        if remembered is None:
            queued = await run_in_threadpool(item_for_prediction, service.queue.directory, body.prediction_id)
            raise ApiError(404, "unknown_prediction", not_remembered_message(body.prediction_id, params.feedback_window, queued))
        if body.label is not None and body.label not in remembered.classes:
            raise ApiError(422, "unknown_label", f"{body.label!r} is not one of the model's classes {remembered.classes}")
        label = body.label if body.label is not None else "wrong"
        item = await run_in_threadpool(
            service.queue.add, image=remembered.image, sha256=remembered.prediction["image_sha256"],
            ext=remembered.ext, reason="feedback", prediction=remembered.prediction, feedback_label=label,
            context=remembered.prediction.get("context"),
        )
        service.metrics.review.labels("feedback").inc()
        if body.label is not None:  # "wrong" without a class says nothing about defect vs good
            outcome = feedback_outcome(remembered.prediction.get("decision"), body.label, remembered.positive_classes)
            service.live.add(outcome)
            service.metrics.feedback_outcomes.labels(outcome).inc()
        return FeedbackOut(review_item=item, prediction_id=body.prediction_id)

    @app.post("/v1/admin/reload", responses=ERRORS)
    async def admin_reload(credentials: Credentials) -> dict[str, Any]:
        service.require_token(credentials)
        try:
            await asyncio.to_thread(service.reload, True)
        except LensmithError as exc:
            still = service.holder.current.version if service.holder.current else "nothing"
            raise ApiError(409, "reload_failed", f"reload failed, still serving {still}: {exc}") from None
        model = service.require_model()
        return {"reloaded": True, "model_version": model.version, "variant": model.variant}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    predict_route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/predict")
    fast_endpoint = MetricsMiddleware(BodyLimitMiddleware(PredictEndpoint(service), limit=params.max_upload_bytes), metrics=service.metrics)
    app.add_middleware(PredictFastPath, endpoint=fast_endpoint, route=predict_route, service=service)  # outermost of ours
    return app
