"""The service's state: the model holder, the micro-batcher and its inference runs, the decode slots, the
prediction log, the review queue, the recent predictions kept for feedback, the metrics, and the token,
model and readiness checks."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.security import HTTPAuthorizationCredentials

from lensmith.errors import LensmithError
from lensmith.livequality import LiveQuality
from lensmith.onnxmodel import TensorRTSettings, softmax
from lensmith.operating import argmax_rule
from lensmith.params import ServeParams
from lensmith.procutil import available_cores
from lensmith.serve.admission import Admission, Verdict
from lensmith.serve.apierrors import ApiError
from lensmith.serve.batching import MicroBatcher
from lensmith.serve.metrics import Metrics
from lensmith.serve.models import ModelHolder, ModelSource, ServedModel
from lensmith.serve.predlog import PredictionLog
from lensmith.serve.review import ReviewQueue
from lensmith.serve.security import token_matches
from lensmith.serve.storage import StorageCollector, log_retention, review_retention

log = logging.getLogger("lensmith.serve")

RECENT_BYTES_LIMIT = 64 * 1024 * 1024
RETRY_AFTER_S = 1  # what a 503 for overload or a missed deadline tells the client to wait


@dataclass
class Remembered:
    prediction: dict[str, Any]
    image: bytes
    ext: str
    classes: list[str]
    positive_classes: tuple[str, ...] = ()  # the defect classes of the rule that decided (none: argmax)


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


@dataclass(frozen=True)
class RunOutput:
    """What the inference thread hands back per image: a fresh prediction id and the top-k classes."""

    id: str
    top_k: list[dict[str, Any]]  # [{"label", "probability"}], most probable first
    decision: str = ""  # defect | ok | review at the model's operating point; the class (or review) for argmax rules
    defect_score: float | None = None


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


def decode_slots_for(params: ServeParams, cores: int | None = None) -> int:
    """Uploads decoded at once: serve.max_concurrent_decodes, or one per core (decoding is CPU-bound, and each
    decode holds an image's pixels in the file's own mode: this bounds the memory of hostile uploads too)."""
    return params.max_concurrent_decodes or cores or available_cores()


def overloaded(message: str) -> ApiError:
    """503 with Retry-After: the client should try again shortly (or elsewhere)."""
    return ApiError(503, "overloaded", message, headers={"Retry-After": str(RETRY_AFTER_S)})


def refusal_message(verdict: Verdict, queued: int) -> str:
    """What a 503 for a refused admission says (names the param that refused it)."""
    if verdict.reason == "queue_full":
        return f"{queued} requests are queued (serve.max_queue); retry shortly"
    wait_ms = (verdict.expected_wait_s or 0.0) * 1000.0
    budget_ms = (verdict.budget_s or 0.0) * 1000.0
    param = "serve.overload_queue_wait_ms, while overloaded" if verdict.reason == "overload_wait" else "serve.max_queue_wait_ms"
    return f"the requests queued would keep this one waiting ~{wait_ms:.0f} ms, over {budget_ms:.0f} ms ({param}); retry shortly"


class Service:
    def __init__(self, params: ServeParams, root: Path, source: ModelSource, token: str | None) -> None:
        self.params = params
        self.token = token
        runners, threads = inference_layout(params)
        self.holder = ModelHolder(
            source, list(params.providers), params.variant, threads, retry_s=params.reload_poll_s, retry_max_s=params.reload_backoff_max_s,
            tensorrt=TensorRTSettings.from_serve(params),
        )
        self.batcher = MicroBatcher(
            self._run, params.max_batch_size, params.max_wait_ms / 1000.0, runners, max_queue=params.max_queue, runner_nice=params.runner_nice
        )
        self.decode_slots_total = decode_slots_for(params)
        self.decode_slots: asyncio.Semaphore | None = None  # made on the event loop, in start()
        self.predlog = PredictionLog(
            root / params.log_dir, params.log_rotate_bytes, retention=log_retention(params), max_backlog=params.log_max_backlog
        )
        self.queue = ReviewQueue(root / params.review_dir, review_retention(params))
        self.recent = RecentPredictions(params.feedback_window)
        self.live = LiveQuality(params.live_window)
        self.preparing = 0  # predict requests admitted whose images are waiting for a decode slot or being decoded
        self.preparing_images = 0  # their images
        self.admission = Admission(
            params.max_queue, params.max_queue_wait_ms, runners,
            overload_budget_ms=params.overload_queue_wait_ms, overload_hold_s=params.overload_hold_s,
        )
        self.metrics = Metrics()
        self.metrics.registry.register(StorageCollector(self.predlog, self.queue))
        self.metrics.queue_depth.set_function(lambda: self.queued)
        self.metrics.watch_admission(self.admission, lambda: self.images_ahead)
        self.metrics.watch_live_quality(self.live)
        self.batcher.on_batch = self._observe_batch
        self.batcher.on_wait = self.metrics.queue_wait.observe

    def start(self) -> None:
        """On the event loop, before serving: the micro-batcher and the decode slots."""
        self.decode_slots = asyncio.Semaphore(self.decode_slots_total)
        self.batcher.start()

    @property
    def queued(self) -> int:
        """Predict requests with a body in hand that are not being run yet: decoding, or waiting for a decode
        slot or for a session run. serve.max_queue bounds them."""
        return self.preparing + self.batcher.waiting

    @property
    def images_ahead(self) -> int:
        """Images a request admitted now would wait for: decoding, waiting for a decode slot or a run, being run."""
        return self.preparing_images + self.batcher.waiting_images + self.batcher.running_images

    def admit(self) -> Verdict:
        """Whether a new predict request may queue (serve.max_queue, serve.max_queue_wait_ms); a refusal is counted."""
        verdict = self.admission.decide(self.queued, self.images_ahead)
        if not verdict.admitted:
            self.metrics.rejected_by_reason[verdict.reason].inc()
        return verdict

    def check_queue(self) -> None:
        """503 overloaded (with Retry-After) when the request may not queue: see `admit`."""
        verdict = self.admit()
        if not verdict.admitted:
            raise overloaded(refusal_message(verdict, self.queued))

    def _observe_batch(self, images: int, seconds: float) -> None:
        self.admission.service_time.observe(images, seconds)
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
        rule = model.rule or argmax_rule(tuple(classes), None)
        decisions, scores = rule.decide_batch(probabilities)
        return [
            RunOutput(ids[32 * i : 32 * (i + 1)], [{"label": classes[c], "probability": p} for c, p in zip(cs, ps)],
                      decisions[i], scores[i])
            for i, (cs, ps) in enumerate(zip(order.tolist(), top.tolist()))
        ]

    def reload(self, force: bool) -> bool:
        try:
            changed = self.holder.reload(force)
        except LensmithError:
            self.metrics.reloads.labels("failed").inc()
            self.metrics.reload_failures.inc()
            raise
        finally:
            self.metrics.degraded.set(1 if self.holder.degraded else 0)
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
                failure = self.holder.failure
                retry = f"; next try in {failure.retry_at - time.monotonic():.0f} s (attempt {failure.attempts})" if failure else ""
                still = self.holder.current.version if self.holder.current else "nothing"
                log.error("hot reload failed, still serving %s: %s%s", still, exc, retry)
            except Exception:
                log.exception("hot reload crashed, still serving the previous model")

    def require_model(self) -> ServedModel:
        """The model being served; a 503 while none is loaded (the reason is in the server log, not the answer:
        it names files and folders of the server)."""
        model = self.holder.current
        if model is None:
            raise ApiError(503, "no_model", "no model is loaded yet; the server log says why", headers={"Retry-After": str(RETRY_AFTER_S)})
        return model

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of GET /v1/ready: 200 when the newest model of the source is being served; 503 with
        no model, and 503 `degraded` while an older model serves because the newest failed to load or warm up
        (predictions still work, on the older model)."""
        model = self.require_model()
        failure = self.holder.failure
        if failure is None:
            return 200, {"ready": True, "model_version": model.version}
        message = (
            f"degraded: serving {model.version}, an older model than {failure.target} which failed to load or warm up "
            f"({failure.attempts} attempt(s)); the server log says why"
        )
        return 503, {
            "error": {"code": "degraded", "message": message},
            "ready": False, "degraded": True, "model_version": model.version, "wanted": failure.target,
        }

    def require_token(self, credentials: HTTPAuthorizationCredentials | str | None) -> None:
        """`credentials`: FastAPI's HTTPBearer result, or the bearer token itself."""
        if self.token is None:
            raise ApiError(403, "disabled", "this endpoint is disabled: the server has no LENSMITH_API_TOKEN set")
        presented = credentials.credentials if isinstance(credentials, HTTPAuthorizationCredentials) else credentials
        if not token_matches(presented, self.token):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
