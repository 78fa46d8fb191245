"""Which model the service runs, and swapping it without dropping a request.

A `ModelSource` says where the model is now (`locate`) and cheaply whether that may have changed
(`fingerprint`): the registry's production version (its id and its model files; other aliases changing
does not count) or a fixed path. `ModelHolder.reload` loads the new model completely and runs a probe
batch through it (outputs of the right shape, all finite) before one attribute assignment makes it current;
requests already holding the old model finish on it. A model that fails to load or to answer the probe
never takes over: the old one keeps serving, the holder is `degraded` (serving an older model than the
source names) and the same model is retried after reload_poll_s, doubling up to reload_backoff_max_s.

A served model's metadata columns (the context a predict request may carry) come from its meta.json
(`resolved.metadata_columns`): in its folder (a registry version), or the candidate's beside the export
stage's folder when the ONNX file was exported from those very weights. Without one it takes no context.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lensmith.errors import LensmithError
from lensmith.jsondoc import dig, read_json_or_none
from lensmith.layout import EXPORT_JSON, INT8_FILE, ONNX_FILE, OPTIMIZED_FILE
from lensmith.onnxmodel import OnnxModel, TensorRTSettings, onnx_file_for
from lensmith.operating import DecisionRule

log = logging.getLogger("lensmith.serve")

SERVED_FILES = (ONNX_FILE, OPTIMIZED_FILE, INT8_FILE, EXPORT_JSON)  # what decides the model a folder serves
PROBE_BATCHES = (1, 2)  # warm-up batch sizes: one image, and more than one (a fixed batch dimension fails)
VERSION_NAME = re.compile(r"^v\d+$")
META_FILE = "meta.json"  # lensmith.modelio's
CANDIDATE_DIR = "candidate"  # the train stage's folder, beside the export stage's (lensmith.layout)
WEIGHTS_KEY = "lensmith.weights_sha256"  # the ONNX metadata naming the weights it was exported from


class ModelSource(Protocol):
    def locate(self) -> Path: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> str: ...


def file_fingerprint(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_mtime_ns}:{st.st_size}"


@dataclass(frozen=True)
class RegistrySource:
    """The registry's `alias` (production by default); changes when aliases.json is rewritten."""

    models_root: Path
    alias: str = "production"

    def locate(self) -> Path:
        from lensmith.registry import Registry

        return Registry(self.models_root).resolve(self.alias)

    def fingerprint(self) -> str:
        """The version the alias names and its model files (size, mtime): a change to another alias in
        aliases.json, or aliases.json rewritten as it was, is no change."""
        from lensmith.registry import Registry

        try:
            folder = Registry(self.models_root).resolve(self.alias)
        except LensmithError as exc:
            return f"unresolved: {exc}"
        return folder.name + "|" + "|".join(f"{name}={file_fingerprint(folder / name)}" for name in SERVED_FILES)

    def describe(self) -> str:
        return f"registry alias {self.alias!r}"


@dataclass(frozen=True)
class PathSource:
    """A model folder (model.onnx, export.json...) or one .onnx file; changes when the file is replaced."""

    path: Path

    def locate(self) -> Path:
        if not self.path.exists():
            raise LensmithError(f"no model at {self.path}; run `lensmith export` or pass --model")
        return self.path

    def fingerprint(self) -> str:
        base = self.path if self.path.is_file() else self.path / ONNX_FILE
        return "|".join(file_fingerprint(base.with_name(name) if name != ONNX_FILE else base) for name in SERVED_FILES)

    def describe(self) -> str:
        return f"path {self.path}"


def production_source(models_root: Path) -> ModelSource:
    """What `lensmith serve` runs without --model: the registry's production model."""
    return RegistrySource(models_root, "production")


@dataclass
class ServedModel:
    onnx: OnnxModel
    version: str
    variant: str
    file: str
    rule: DecisionRule | None = None  # how a prediction becomes a decision (the export's choice, from the file)
    metadata_columns: tuple[str, ...] = ()  # the context a predict request may carry (lensmith.serve.context)
    loaded_at: float = field(default_factory=time.time)


def model_meta(folder: Path, onnx: OnnxModel) -> dict[str, Any] | None:
    """The served model's meta.json: the folder's own, else the candidate's beside the export stage's folder
    when `onnx` was exported from the candidate's weights; None when neither."""
    own = read_json_or_none(folder / META_FILE)
    if isinstance(own, dict):
        return own
    candidate = read_json_or_none(folder.parent / CANDIDATE_DIR / META_FILE)
    weights = onnx.metadata.get(WEIGHTS_KEY)
    if isinstance(candidate, dict) and weights and candidate.get("weights_sha256") == weights:
        return candidate
    return None


def metadata_columns_of(meta: dict[str, Any] | None) -> tuple[str, ...]:
    """The metadata columns a model was trained with, as meta.json records them (lensmith.resolve)."""
    columns = dig(meta, "resolved.metadata_columns")
    return tuple(str(c) for c in columns) if isinstance(columns, list) else ()


def load_served_model(
    location: Path, providers: list[str], variant: str, threads: int, tensorrt: TensorRTSettings | None = None
) -> ServedModel:
    path, chosen = onnx_file_for(location, variant, providers)
    onnx = OnnxModel.load(path, providers, threads=threads, tensorrt=tensorrt)
    # a registry version folder is named v0003: that is the version people talk about
    folder = location if location.is_dir() else location.parent
    version = folder.name if folder.name.startswith("v") and folder.name[1:].isdigit() else onnx.version
    return ServedModel(
        onnx=onnx, version=version, variant=chosen, file=path.name, rule=onnx.decision_rule(),
        metadata_columns=metadata_columns_of(model_meta(folder, onnx)),
    )


def warm_up(model: ServedModel) -> None:
    """Run probe batches (seeded noise at the model's input size) through the model as serving runs it;
    raise LensmithError unless every output is finite and has one score per class for each image."""
    pre = model.onnx.preprocessing
    rng = np.random.default_rng(0)
    for n in PROBE_BATCHES:
        batch = rng.integers(0, 256, (n, pre.num_channels, pre.image_size, pre.image_size), dtype=np.uint8)
        try:
            logits = np.asarray(model.onnx.logits(pre.normalize(batch)))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise LensmithError(f"model {model.version} failed its warm-up inference on {n} image(s): {type(exc).__name__}: {exc}") from exc
        expected = (n, len(model.onnx.classes))
        if logits.shape != expected:
            raise LensmithError(f"model {model.version} answered the warm-up batch with shape {logits.shape}, expected {expected}")
        if not np.isfinite(logits).all():
            raise LensmithError(f"model {model.version} answered the warm-up batch with non-finite scores")


def target_name(location: Path) -> str:
    """What a log line or an answer may call a model location: its version id, never a path."""
    folder = location if location.is_dir() else location.parent
    return folder.name if VERSION_NAME.match(folder.name) else "the new model file"


@dataclass
class ReloadFailure:
    """The newest model of the source that could not be loaded or warmed up, and when to try it again."""

    fingerprint: str
    target: str  # version id, or a generic name (never a path: it is shown to clients)
    error: str  # for the log and the admin answer
    attempts: int
    retry_at: float  # time.monotonic()


class ModelHolder:
    def __init__(
        self, source: ModelSource, providers: list[str], variant: str, threads: int,
        retry_s: float = 2.0, retry_max_s: float = 300.0, tensorrt: TensorRTSettings | None = None,
    ) -> None:
        self.source = source
        self.providers = providers
        self.tensorrt = tensorrt
        self.variant = variant
        self.threads = threads
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self.current: ServedModel | None = None
        self.failure: ReloadFailure | None = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    @property
    def last_error(self) -> str | None:
        return self.failure.error if self.failure is not None else None

    @property
    def degraded(self) -> bool:
        """Serving a model while the source's newest could not be loaded: an older model than wanted."""
        return self.current is not None and self.failure is not None

    def reload(self, force: bool = False) -> bool:
        """Load the source's model if it changed (or `force`); True when a new model took over.

        Raises LensmithError when the new model cannot be loaded or fails its warm-up; the current one keeps
        serving. Without `force`, a model that failed is tried again only once its back-off has passed.
        """
        with self._lock:
            fingerprint = self.source.fingerprint()
            if not force and self.current is not None and fingerprint == self._fingerprint:
                self.failure = None  # e.g. production rolled back to the model being served
                return False
            failed = self.failure if self.failure is not None and self.failure.fingerprint == fingerprint else None
            if not force and failed is not None and time.monotonic() < failed.retry_at:
                return False
            target = "the model"
            try:
                location = self.source.locate()
                target = target_name(location)
                new = load_served_model(location, self.providers, self.variant, self.threads, self.tensorrt)
                warm_up(new)
            except Exception as exc:  # noqa: BLE001 - whatever a new model does, the old one keeps serving
                attempts = failed.attempts + 1 if failed is not None else 1
                delay = min(self.retry_max_s, self.retry_s * 2 ** (attempts - 1))
                self.failure = ReloadFailure(fingerprint, target, str(exc), attempts, time.monotonic() + delay)
                if isinstance(exc, LensmithError):
                    raise
                raise LensmithError(f"loading {target} failed: {type(exc).__name__}: {exc}") from exc
            previous = self.current
            self.current = new
            self._fingerprint = fingerprint
            self.failure = None
        if previous is None or previous.version != new.version or previous.file != new.file:
            log.info("serving model %s (%s, %s) from %s", new.version, new.variant, new.onnx.provider, self.source.describe())
        return True
