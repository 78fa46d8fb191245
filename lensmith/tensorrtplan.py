"""`lensmith export --tensorrt`: a TensorRT plan (models/export/model.plan) built from the exported fp32 model.onnx
with the `tensorrt` package (TensorRT 10 Python API), gated by the same parity check as the ONNX files.

- Settings from the same source as serving (`TensorRTSettings.from_serve`): fp16 kernels when serve.tensorrt_fp16,
  one optimisation profile with batches 1..serve.max_batch_size (opt = max: the micro-batcher's full batches) and the
  model's own input name and C x H x W (read from model.onnx).
- Parity: the plan runs the parity images (the same test images and eager PyTorch reference as model.onnx) with torch
  CUDA tensors as its input/output buffers, in chunks of at most the profile's max batch; `parity` and `check_parity`
  from lensmith.export judge it. Top-1 agreement needs export.parity_min_top1_agreement, as for ONNX. The max |logit
  diff| allowed depends on the plan's precision (see `plan_tolerance`).
- Nothing half-written: the plan is written atomically, removed again when its parity fails (a ParityError), and
  run_export builds it inside the export's temporary folder, so a failure leaves the previous models/export as it was.
- A plan only runs on the GPU model and TensorRT version it was built with: export.json's `tensorrt` block records
  both (and the compute capability), and `load_plan` refuses a plan recorded for another GPU or TensorRT version.
- Without a GPU stack, `tensorrt_backend` fails before any work: no `tensorrt` package, or no CUDA device for torch.

Unmeasured on a GPU so far (no GPU machine has run it): the unit tests drive the gate with a fake plan backend, and
tests/test_tensorrtplan.py holds a real build that runs only where `tensorrt` and CUDA exist.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lensmith.export import OUTPUT_NAME, ExportError, accuracy, check_parity, parity, served_logits
from lensmith.fsutil import atomic_path, file_sha256
from lensmith.layout import EXPORT_JSON
from lensmith.onnxmodel import TensorRTSettings, model_input
from lensmith.params import ExportParams, Params
from lensmith.preprocess import Preprocessing

log = logging.getLogger("lensmith.tensorrt")

PLAN_FILE = "model.plan"
MIN_TENSORRT_MAJOR = 10  # named-tensor API (set_input_shape, set_tensor_address, execute_async_v3), explicit batch
INSTALL_HINT = "install the tensorrt package matching your CUDA, e.g. `pip install tensorrt`"

Runner = Callable[[np.ndarray], np.ndarray]  # normalised float32 N x C x H x W -> logits N x classes


class TensorRTError(ExportError):
    """A TensorRT plan cannot be built, loaded or run here (no package, no GPU, parser/builder failure, wrong GPU)."""


# ---- what a plan is built for ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanProfile:
    """The one optimisation profile: batches 1..max_batch of input `input_name` with fixed non-batch `dims`."""

    input_name: str
    dims: tuple[int, ...]  # C, H, W
    max_batch: int

    @classmethod
    def from_model(cls, onnx_path: Path, settings: TensorRTSettings) -> PlanProfile:
        name, dims = model_input(onnx_path)
        if not dims or any(d <= 0 for d in dims):
            raise TensorRTError(
                f"{onnx_path.name} has a dynamic input size {dims} for {name!r}: a TensorRT plan needs a fixed C x H x W"
            )
        return cls(input_name=name, dims=tuple(dims), max_batch=settings.max_batch)

    @property
    def min_shape(self) -> tuple[int, ...]:
        return (1, *self.dims)

    @property
    def opt_shape(self) -> tuple[int, ...]:
        return (self.max_batch, *self.dims)

    @property
    def max_shape(self) -> tuple[int, ...]:
        return (self.max_batch, *self.dims)

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.input_name, "min": list(self.min_shape), "opt": list(self.opt_shape), "max": list(self.max_shape)}


@dataclass(frozen=True)
class PlanTarget:
    """What a serialized plan is tied to: the TensorRT version and the GPU model it was built on."""

    tensorrt_version: str
    gpu: str
    compute_capability: str


def check_plan_target(recorded: PlanTarget, here: PlanTarget, plan: Path) -> None:
    """A TensorRTError unless the plan was built for this GPU model and TensorRT version (TensorRT itself may load
    a plan from another GPU of the same compute capability and run it slowly or wrongly, or fail deep inside)."""
    if recorded == here:
        return
    raise TensorRTError(
        f"{plan} was built for {recorded.gpu} (compute capability {recorded.compute_capability}) with TensorRT "
        f"{recorded.tensorrt_version}; this machine has {here.gpu} (compute capability {here.compute_capability}) with "
        f"TensorRT {here.tensorrt_version}. A plan runs only on the GPU model and TensorRT version it was built with: "
        "rebuild it here with `lensmith export --tensorrt`"
    )


def plan_tolerance(ep: ExportParams, fp16: bool) -> ExportParams:
    """The parity tolerance a plan is held to, as ExportParams so that `check_parity` reports it.

    An fp32 plan (TF32 turned off) is held to the ONNX tolerance, parity_max_abs_diff + parity_rtol x max |logit|:
    it computes what model.onnx computes, in another order. fp16 rounds every activation to 11 significant bits
    (relative 2^-11 ~ 5e-4 per layer, compounding over a few dozen layers), so its logits differ from fp32 by
    ~1e-3..1e-2 of their scale: the 1e-4 fp32 bound would fail every fp16 plan. It gets its own pair,
    tensorrt_fp16_max_abs_diff + tensorrt_fp16_rtol x max |logit|, loose enough for rounding and tight enough to
    catch a broken layer or an fp16 overflow; whether fp16 changes decisions is judged by top-1 agreement, with the
    same export.parity_min_top1_agreement as ONNX (a near-tie image may flip: lower that, or serve fp32).
    """
    if not fp16:
        return ep
    return ep.model_copy(update={"parity_max_abs_diff": ep.tensorrt_fp16_max_abs_diff, "parity_rtol": ep.tensorrt_fp16_rtol})


# ---- the backend: the real one needs tensorrt and a CUDA GPU; tests pass a fake -------------------------------------


class PlanBackend(Protocol):
    target: PlanTarget

    def build(self, onnx_path: Path, profile: PlanProfile, fp16: bool) -> bytes:
        """The serialized plan."""
        ...

    def open(self, plan_path: Path, profile: PlanProfile) -> Runner:
        """A function running the plan on one batch of at most profile.max_batch images."""
        ...


def wants_tensorrt(params: Params, requested: bool = False) -> bool:
    """`--tensorrt` turns the plan on for one run whatever export.tensorrt says; without it, export.tensorrt decides."""
    return bool(requested) or params.export.tensorrt


def tensorrt_backend(params: Params, requested: bool = False, import_module: Callable[[str], Any] = importlib.import_module) -> PlanBackend | None:
    """None when no plan is wanted; else the TensorRT backend, or a TensorRTError saying what is missing. Cheap:
    run_export calls it before reading any model or image, so a missing GPU stack never costs an export."""
    if not wants_tensorrt(params, requested):
        return None
    settings = TensorRTSettings.from_serve(params.serve)
    try:
        trt = import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTError(
            f"a TensorRT plan (`lensmith export --tensorrt` or export.tensorrt: true) needs the `tensorrt` Python package, "
            f"which cannot be imported here ({type(exc).__name__}: {exc}): {INSTALL_HINT}"
        ) from None
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTError(f"TensorRT {version} is too old for Lensmith's plan builder (it needs {MIN_TENSORRT_MAJOR} or newer): {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError(
            f"a TensorRT plan needs a CUDA GPU, and torch {torch.__version__} sees none (torch.cuda.is_available() is False; "
            f"torch's CUDA build: {torch.version.cuda or 'none, a CPU-only torch'}). Build the plan on the GPU model that will serve it"
        )
    if settings.fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise TensorRTError(
            f"serve.tensorrt_fp16 is true but TensorRT {version} has no BuilderFlag.FP16 (removed in TensorRT 11: fp16 there "
            "needs a strongly typed fp16 graph). Set serve.tensorrt_fp16: false for an fp32 plan, or install tensorrt<11"
        )
    return TensorRTBackend(trt)


_LOGGERS: dict[int, tuple[Any, Any]] = {}  # id(tensorrt module) -> (module, its one logger)


def _collecting_logger(trt: Any) -> Any:
    """The process's one TensorRT logger: it forwards warnings to Lensmith's log and keeps errors for exception
    messages (read `errors[mark:]` from a mark taken before the call). One for all builders and runtimes, kept alive:
    TensorRT keeps the first logger it was given as its global one, and would call into a collected Python object."""
    entry = _LOGGERS.get(id(trt))
    if entry is not None and entry[0] is trt:
        return entry[1]

    class CollectingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)

    logger = CollectingLogger()
    _LOGGERS[id(trt)] = (trt, logger)
    return logger


def _errors_since(logger: Any, mark: int) -> str:
    return "; ".join(logger.errors[mark:]) or "no message"


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    pairs = [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16), ("int32", torch.int32),
             ("int64", torch.int64), ("int8", torch.int8), ("uint8", torch.uint8), ("bool", torch.bool)]
    for name, torch_dtype in pairs:
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return torch_dtype
    raise TensorRTError(f"TensorRT tensor type {dtype} has no torch equivalent")


def parser_errors(parser: Any) -> list[str]:
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


class TensorRTBackend:
    """Builds and runs plans on the current CUDA device with the TensorRT 10 Python API."""

    def __init__(self, trt: Any) -> None:
        import torch

        self.trt = trt
        device = torch.cuda.current_device()  # also creates the CUDA context TensorRT works in
        major, minor = torch.cuda.get_device_capability(device)
        self.target = PlanTarget(str(trt.__version__), torch.cuda.get_device_name(device), f"{major}.{minor}")

    def build(self, onnx_path: Path, profile: PlanProfile, fp16: bool) -> bytes:
        trt = self.trt
        logger = _collecting_logger(trt)
        mark = len(logger.errors)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(parser_errors(parser)) or _errors_since(logger, mark)
            raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
        inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        if profile.input_name not in inputs:
            raise TensorRTError(f"{onnx_path.name}: TensorRT sees inputs {inputs}, not the model's {profile.input_name!r}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if hasattr(trt.BuilderFlag, "TF32"):  # on by default: an fp32 plan should compute fp32, as model.onnx does
            config.clear_flag(trt.BuilderFlag.TF32)
        shapes = builder.create_optimization_profile()
        shapes.set_shape(profile.input_name, profile.min_shape, profile.opt_shape, profile.max_shape)
        config.add_optimization_profile(shapes)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTError(f"TensorRT could not build a plan from {onnx_path.name}: {_errors_since(logger, mark)}")
        return bytes(serialized)

    def open(self, plan_path: Path, profile: PlanProfile) -> Runner:
        return PlanRunner(self.trt, plan_path.read_bytes(), profile).logits


class PlanRunner:
    """One deserialized plan and its execution context; torch CUDA tensors are the input/output buffers, the work
    runs on torch's current stream."""

    def __init__(self, trt: Any, plan: bytes, profile: PlanProfile) -> None:
        self.trt, self.profile = trt, profile
        self.logger = _collecting_logger(trt)
        mark = len(self.logger.errors)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TensorRTError(f"TensorRT cannot deserialize the plan: {_errors_since(self.logger, mark)}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if profile.input_name not in names or not self.outputs:
            raise TensorRTError(f"the plan's tensors {names} lack the input {profile.input_name!r} or an output")
        self.output = OUTPUT_NAME if OUTPUT_NAME in self.outputs else self.outputs[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if not 1 <= len(batch) <= self.profile.max_batch:
            raise TensorRTError(f"a batch of {len(batch)} is outside the plan's profile 1..{self.profile.max_batch}")
        engine, context, name = self.engine, self.context, self.profile.input_name
        device = torch.device("cuda", torch.cuda.current_device())
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device=device, dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(name)))
        if not context.set_input_shape(name, tuple(x.shape)):
            raise TensorRTError(f"TensorRT refused input shape {tuple(x.shape)} for {name!r} (profile {self.profile.as_dict()})")
        context.set_tensor_address(name, x.data_ptr())
        buffers = {}
        for out in self.outputs:  # every output needs an address, even those we do not read
            shape = tuple(context.get_tensor_shape(out))
            buffers[out] = torch.empty(shape, dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(out)), device=device)
            context.set_tensor_address(out, buffers[out].data_ptr())
        stream = torch.cuda.current_stream(device)
        mark = len(self.logger.errors)
        if not context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"TensorRT failed to run the plan: {_errors_since(self.logger, mark)}")
        stream.synchronize()
        return buffers[self.output].float().cpu().numpy()


# ---- the export step ---------------------------------------------------------------------------------------------


def plan_logits(backend: PlanBackend, plan: Path, profile: PlanProfile, images: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The plan's logits for uint8 `images`, in chunks of at most the profile's max batch (the engine and its context
    are released on return, before the caller moves the folder)."""
    run = backend.open(plan, profile)
    return served_logits(lambda batch: run(preprocessing.normalize(batch)), images, profile.max_batch)



def export_plan(
    backend: PlanBackend,
    params: Params,
    onnx_path: Path,
    folder: Path,
    images: np.ndarray,
    reference: np.ndarray,
    preprocessing: Preprocessing,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Build folder/model.plan from `onnx_path`, run it on the parity `images` (uint8 N x C x H x W) and gate it
    against the eager PyTorch `reference` logits; the block export.json records. On any failure the plan is
    removed (a ParityError from `check_parity` when the gate fails)."""
    settings = TensorRTSettings.from_serve(params.serve)
    profile = PlanProfile.from_model(onnx_path, settings)
    target = folder / PLAN_FILE
    start = time.perf_counter()
    plan = backend.build(onnx_path, profile, settings.fp16)
    build_seconds = time.perf_counter() - start
    with atomic_path(target) as tmp:
        tmp.write_bytes(plan)
    tolerance = plan_tolerance(params.export, settings.fp16)
    try:
        logits = plan_logits(backend, target, profile, images, preprocessing)
        result = parity(reference, logits)
        precision = "fp16" if settings.fp16 else "fp32"
        check_parity(result, tolerance, f"{PLAN_FILE} (TensorRT {backend.target.tensorrt_version}, {precision}, {backend.target.gpu})")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    block: dict[str, Any] = {
        "file": PLAN_FILE,
        **asdict(backend.target),
        "fp16": settings.fp16,
        "tf32": False,
        "profile": profile.as_dict(),
        "build_seconds": build_seconds,
        "size_bytes": target.stat().st_size,
        "sha256": file_sha256(target),
        "source": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "parity": {**result.__dict__, "max_allowed": result.allowed_diff(tolerance), "min_top1_agreement": tolerance.parity_min_top1_agreement},
    }
    if labels is not None and len(labels):
        block["accuracy"] = accuracy(logits, labels)
    log.info("TensorRT plan %s: %.1f s to build, parity max |logit diff| %.3g", target, build_seconds, result.max_abs_diff)
    return block


def summary_line(block: dict[str, Any]) -> str:
    p = block["parity"]
    return (
        f"TensorRT plan {block['file']} ({'fp16' if block['fp16'] else 'fp32'}, batch 1..{block['profile']['max'][0]}, "
        f"TensorRT {block['tensorrt_version']} on {block['gpu']}): max |logit diff| {p['max_abs_diff']:.2e}, "
        f"top-1 agreement {p['top1_agreement']:.2%}"
    )


# ---- loading a plan -------------------------------------------------------------------------------------------------


def recorded_plan(plan_path: Path) -> dict[str, Any]:
    """The `tensorrt` block of the export.json beside the plan (what it was built for and from)."""
    report = plan_path.parent / EXPORT_JSON
    try:
        block = json.loads(report.read_text(encoding="utf-8"))["tensorrt"]
        PlanTarget(str(block["tensorrt_version"]), str(block["gpu"]), str(block["compute_capability"]))
        return dict(block)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TensorRTError(
            f"{plan_path}: no record of the GPU and TensorRT version it was built for in {report} ({type(exc).__name__}: {exc}); "
            "rebuild it with `lensmith export --tensorrt`"
        ) from None


def load_plan(plan_path: Path, backend: PlanBackend) -> Runner:
    """Open a plan written by `lensmith export --tensorrt`, refusing one built for another GPU model or TensorRT
    version, or whose bytes are not the ones recorded (the runner takes normalised float32 batches of at most the
    recorded profile's max)."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise TensorRTError(f"no TensorRT plan at {plan_path}; build one with `lensmith export --tensorrt`")
    block = recorded_plan(plan_path)
    recorded = PlanTarget(str(block["tensorrt_version"]), str(block["gpu"]), str(block["compute_capability"]))
    check_plan_target(recorded, backend.target, plan_path)
    if block.get("sha256") and file_sha256(plan_path) != block["sha256"]:
        raise TensorRTError(f"{plan_path} is not the plan its export.json records (sha256 differs); rebuild it with `lensmith export --tensorrt`")
    shapes = block["profile"]
    profile = PlanProfile(str(shapes["input"]), tuple(int(d) for d in shapes["max"][1:]), int(shapes["max"][0]))
    return backend.open(plan_path, profile)
