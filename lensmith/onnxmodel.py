"""An ONNX Runtime session around an exported Lensmith model: providers with fallback, the model's own
metadata (classes, preprocessing, version) read from `metadata_props`, and prediction on decoded images
through the shared `Preprocessing`. Imports neither torch nor onnx, so a serving site needs neither.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from lensmith.errors import LensmithError
from lensmith.layout import EXPORT_JSON, INT8_FILE, ONNX_FILE, OPTIMIZED_FILE
from lensmith.operating import DecisionRule, argmax_rule
from lensmith.preprocess import Preprocessing

log = logging.getLogger("lensmith.onnx")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# metadata_props keys written by `lensmith export`
META_PREFIX = "lensmith."
META_CLASSES = "lensmith.classes"
META_PREPROCESSING = "lensmith.preprocessing"
META_VERSION = "lensmith.model_version"
META_DECISION = "lensmith.decision"  # JSON of lensmith.operating.DecisionRule (export chooses it on validation)


class OnnxModelError(LensmithError):
    """An ONNX model file is missing, unreadable or lacks Lensmith's metadata."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


AUTO = "auto"
ProviderPolicy = str | Sequence[str]  # "auto", or provider names in preference order (params: lensmith.params.ProviderPolicy)
GPU_PROVIDERS = (TENSORRT, CUDA)


def requested_providers(policy: ProviderPolicy) -> list[str]:
    """The providers to ask ONNX Runtime for, in preference order. "auto": CUDA then CPU when this onnxruntime build
    offers CUDA, else CPU only; never TensorRT (its engine builds take minutes: ask for it by name). A list is taken as
    given; `usable_providers` then skips what this build lacks."""
    if isinstance(policy, str):
        if policy != AUTO:
            raise ValueError(f"provider policy must be {AUTO!r} or a list of provider names, got {policy!r}")
        return [CUDA, CPU] if CUDA in available_providers() else [CPU]
    return list(policy)


def runs_on_gpu(providers: Sequence[str]) -> bool:
    """Whether the first provider of a chosen list (or of a session) is a GPU one."""
    return bool(providers) and providers[0] in GPU_PROVIDERS


@functools.cache
def preload_gpu_libraries() -> bool:
    """Load CUDA and cuDNN for onnxruntime-gpu once per process, before the first GPU session.

    `pip install .[gpu]` brings them as NVIDIA's wheels (site-packages/nvidia/*/lib), which the dynamic loader does
    not search; torch finds them when it is imported, but the service never imports torch. onnxruntime >= 1.21's
    `preload_dlls` loads torch's copies when torch is loaded, else the wheels'. False when it could not (an older
    onnxruntime, or libraries installed system-wide, where the loader finds them anyway)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return False
    try:
        preload()
    except Exception as exc:  # the session start that follows reports a real absence, with ORT's own message
        log.warning("onnxruntime: could not preload the CUDA/cuDNN libraries (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def usable_providers(requested: Sequence[str]) -> list[str]:
    """`requested` in order, minus those this onnxruntime build lacks; CPU is always the last resort."""
    available = set(available_providers())
    chosen = [p for p in requested if p in available]
    skipped = [p for p in requested if p not in available]
    if skipped:
        log.warning("onnxruntime: provider(s) %s not available in this build (%s); falling back", skipped, sorted(available))
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


TENSORRT_CACHE_ENV = "LENSMITH_TENSORRT_CACHE"


def tensorrt_cache_dir(model_path: Path) -> Path:
    """Where TensorRT's engines for this model file are cached: under $LENSMITH_TENSORRT_CACHE (default
    ~/.cache/lensmith/tensorrt), in a folder named by the file's content hash. Never beside the model: registry
    versions are DVC-tracked, and an engine written there would make `dvc status` report them changed. A new
    model gets a new folder (an engine is only valid for the file it was built from)."""
    import hashlib

    root = Path(os.environ.get(TENSORRT_CACHE_ENV) or Path.home() / ".cache" / "lensmith" / "tensorrt")
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return root / digest.hexdigest()[:16]


@dataclass(frozen=True)
class TensorRTSettings:
    """How the TensorRT provider builds its engine: fp16 kernels, and one batch profile from 1 to `max_batch`
    (the micro-batcher's serve.max_batch_size) so that no batch size the service runs rebuilds an engine."""

    fp16: bool = False
    max_batch: int = 32

    @classmethod
    def from_serve(cls, serve: Any) -> TensorRTSettings:
        """From the `serve` params (serve.tensorrt_fp16, serve.max_batch_size): the one source that the service's
        provider and `lensmith export --tensorrt`'s plan both read."""
        return cls(fp16=bool(serve.tensorrt_fp16), max_batch=int(serve.max_batch_size))


def model_input(path: Path) -> tuple[str, tuple[int, ...]]:
    """The ONNX file's first input: its name and its non-batch dimensions (read without the weights)."""
    import onnx

    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:])
    return graph_input.name, dims


def tensorrt_profile(name: str, dims: Sequence[int], max_batch: int) -> dict[str, str]:
    """TensorRT's min/opt/max shapes for batches of 1..max_batch (opt at max_batch: the micro-batcher's full batches)."""
    if not dims or any(d <= 0 for d in dims):
        return {}  # a dynamic spatial size: TensorRT builds per shape met instead
    shape = "x".join(str(d) for d in dims)
    return {
        "trt_profile_min_shapes": f"{name}:1x{shape}",
        "trt_profile_opt_shapes": f"{name}:{max_batch}x{shape}",
        "trt_profile_max_shapes": f"{name}:{max_batch}x{shape}",
    }


def ort_version() -> tuple[int, int]:
    major, minor = (ort.__version__.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def exact_cuda_options() -> dict[str, Any]:
    """CUDA provider options of the measuring stages (evaluation, export parity, drift embeddings, champion scoring):
    no TF32. ORT's CUDA provider lets cuBLAS matmuls and cuDNN convolutions round float32 inputs to TF32 (10-bit
    mantissa) on Ampere and later GPUs by default; `use_tf32=0` (onnxruntime >= 1.18) keeps them in full float32, so
    a measured figure or a parity difference is the model's, not the GPU's math mode. Serving keeps ORT's defaults."""
    if ort_version() < (1, 18):  # older builds reject unknown keys; NVIDIA_TF32_OVERRIDE=0 is the only switch there
        log.warning("onnxruntime %s has no use_tf32 option: CUDA may use TF32 (set NVIDIA_TF32_OVERRIDE=0)", ort.__version__)
        return {}
    return {"use_tf32": "0"}


def provider_options(
    provider: str,
    cache_dir: Path | None,
    tensorrt: TensorRTSettings | None = None,
    model: tuple[str, tuple[int, ...]] | None = None,
    exact: bool = False,
) -> dict[str, Any]:
    """TensorRT builds an engine per input shape range: cache it (see `tensorrt_cache_dir`) so restarts are fast;
    with `tensorrt`, fp16 and the batch profile for the `model` input (name, non-batch dims). CUDA with `exact`: full
    float32 (see `exact_cuda_options`)."""
    if provider == CUDA:
        return exact_cuda_options() if exact else {}
    if provider != TENSORRT or cache_dir is None:
        return {}
    options: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": True}
    if tensorrt is not None:
        options["trt_fp16_enable"] = tensorrt.fp16
        if model is not None:
            options.update(tensorrt_profile(model[0], model[1], tensorrt.max_batch))
    return options


def session_options(threads: int = 0, optimized_path: Path | None = None, level: str = "all") -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.log_severity_level = 3  # errors only: provider fallback is reported by our own log line
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def open_session(
    path: Path,
    providers: ProviderPolicy = (CPU,),
    *,
    threads: int = 0,
    optimized_path: Path | None = None,
    level: str = "all",
    tensorrt: TensorRTSettings | None = None,
    exact: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession on the first usable provider of `providers` ("auto" or a list, see `requested_providers`);
    logs the provider that actually runs. `tensorrt`: how the TensorRT provider builds its engine, when it is requested
    and available. `exact`: a measuring stage's session (no TF32 on CUDA, see `exact_cuda_options`)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"no ONNX model at {path}; run `lensmith export` first")
    chosen = usable_providers(requested_providers(providers))
    if runs_on_gpu(chosen):
        preload_gpu_libraries()
    cache_dir = tensorrt_cache_dir(path) if TENSORRT in chosen else None
    model = model_input(path) if TENSORRT in chosen and tensorrt is not None else None
    with_options = [(p, provider_options(p, cache_dir, tensorrt, model, exact)) for p in chosen]
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(threads, optimized_path, level), providers=with_options
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise OnnxModelError(f"{path} cannot be loaded by onnxruntime ({type(exc).__name__}: {exc})") from None
    active = session.get_providers()
    requested = providers if isinstance(providers, str) else list(providers)
    log.info("onnxruntime: %s runs on %s (requested %s)", path.name, active[0], requested)
    if active[0] != chosen[0]:
        log.warning("onnxruntime: %s could not start on %s; running on %s instead", path.name, chosen[0], active[0])
    return session


def session_metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The model's `metadata_props` as ONNX Runtime exposes them (a str -> str map)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass
class OnnxModel:
    session: ort.InferenceSession
    path: Path
    classes: list[str]
    preprocessing: Preprocessing
    metadata: dict[str, str]

    @classmethod
    def load(
        cls,
        path: Path,
        providers: ProviderPolicy = (CPU,),
        threads: int = 0,
        tensorrt: TensorRTSettings | None = None,
        exact: bool = False,
    ) -> OnnxModel:
        """`providers`: "auto" or a preference list (see `open_session`); `exact`: for measuring stages (no TF32)."""
        session = open_session(path, providers, threads=threads, tensorrt=tensorrt, exact=exact)
        metadata = session_metadata(session)
        try:
            classes = json.loads(metadata[META_CLASSES])
            preprocessing = Preprocessing.from_dict(json.loads(metadata[META_PREPROCESSING]))
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxModelError(
                f"{path} lacks Lensmith metadata ({type(exc).__name__}: {exc}); export it with `lensmith export`"
            ) from None
        return cls(session=session, path=Path(path), classes=list(classes), preprocessing=preprocessing, metadata=metadata)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def version(self) -> str:
        return self.metadata.get(META_VERSION, "unknown")

    def decision_rule(self) -> DecisionRule:
        """The rule the export chose for this file on validation (argmax for files exported before rules existed)."""
        raw = self.metadata.get(META_DECISION)
        if raw is None:
            return argmax_rule(tuple(self.classes), None)
        try:
            return DecisionRule.from_dict(json.loads(raw))
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxModelError(f"{self.path}: damaged {META_DECISION} metadata ({type(exc).__name__}: {exc})") from None

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def logits(self, batch_nchw_float32: np.ndarray) -> np.ndarray:
        """Raw logits for an already normalised float32 N x C x H x W batch."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch_nchw_float32, dtype=np.float32)})[0]

    def logits_uint8(self, batch_nchw_uint8: np.ndarray) -> np.ndarray:
        """Logits for N x C x H x W uint8 at the input size (the training cache's format)."""
        return self.logits(self.preprocessing.normalize(batch_nchw_uint8))

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images of any size -> class probabilities (N x classes, float64)."""
        return softmax(self.logits(self.preprocessing.batch(images)))


# ---- which exported file is served -------------------------------------------------------------------------


def read_serving_variant(model_dir: Path) -> str:
    try:
        return str(json.loads((model_dir / EXPORT_JSON).read_text(encoding="utf-8")).get("serving_variant", "fp32"))
    except (OSError, ValueError, AttributeError):
        return "fp32"


def onnx_file_for(location: Path, variant: str, providers: Sequence[str]) -> tuple[Path, str]:
    """(file, variant) to load from a model folder, honouring serve.variant (auto = the export's choice).

    `providers`: the preference list the session will be opened with; what decides is its first provider this
    onnxruntime build has. On a GPU one the fp32 graph runs: the export chose int8 (static QDQ, a CPU path) for its
    speed on the CPU, so auto never picks it there (serve.variant: int8 still forces it)."""
    if location.is_file():
        return location, "int8" if location.name == INT8_FILE else "fp32"
    available = set(available_providers())
    gpu_first = runs_on_gpu([p for p in providers if p in available])
    wanted = read_serving_variant(location) if variant == "auto" else variant
    if wanted == "int8" and variant == "auto" and gpu_first:
        log.info("onnxruntime: the export chose int8 for the CPU; the fp32 graph runs on the GPU provider")
        wanted = "fp32"
    if wanted == "int8" and (location / INT8_FILE).is_file():
        return location / INT8_FILE, "int8"
    if wanted == "int8" and variant == "int8":
        raise LensmithError(f"serve.variant is int8 but {location} has no {INT8_FILE} (the export rejected or skipped it)")
    # the EXTENDED-optimised graph holds CPU-specific fused ops: only for CPU-first sessions
    if not gpu_first and (location / OPTIMIZED_FILE).is_file():
        return location / OPTIMIZED_FILE, "fp32"
    return location / ONNX_FILE, "fp32"
