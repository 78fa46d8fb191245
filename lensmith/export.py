"""`lensmith export`: models/candidate/model.pt -> models/export/model.onnx (+ model.int8.onnx when it earns its place).

1. torch.onnx.export (dynamo exporter, one file, dynamic batch axis) with Lensmith's metadata in
   `metadata_props`, then `onnx.checker` with the full check.
2. Parity gate on the real test split through the shared preprocessing: max |logit diff| and top-1
   agreement against eager PyTorch; a failure stops the export with the numbers.
3. The ONNX Runtime graph optimised at ORT_ENABLE_EXTENDED saved beside it (model.opt.onnx; model.onnx
   stays the portable graph that TensorRT and other runtimes take).
4. Static int8 (QDQ, per-channel weights, calibrated on training images) kept only when its test accuracy
   is within export.int8_max_drop of fp32; it is chosen for serving only when it is faster here.
5. models/export/export.json and reports/export.json: parity, accuracies, sizes, latencies, provider.
6. With `--tensorrt` / export.tensorrt: a TensorRT plan (model.plan) under the same parity gate (lensmith.tensorrtplan).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lensmith
from lensmith.errors import GateFailedError, LensmithError
from lensmith.fsutil import atomic_dir, write_json_atomic
from lensmith.layout import EXPORT_JSON, INT8_FILE, ONNX_FILE, OPTIMIZED_FILE, Layout
from lensmith.modelio import TrainedModel, load_candidate
from lensmith.decisionrule import choose_decision_rule
from lensmith.onnxmodel import META_CLASSES, META_DECISION, META_PREPROCESSING, META_VERSION, OnnxModel, open_session, softmax
from lensmith.params import ExportParams, Params
from lensmith.preprocess import Preprocessing
from lensmith.split import read_split_frame
from lensmith.splitdata import MODEL_LABELS, SplitData, load_split_data

log = logging.getLogger("lensmith.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SPEED_BATCHES = (1, 32)
INT8_FASTER_MARGIN = 1.05  # int8 must beat fp32 by 5% to be chosen: below that it is measurement noise here


class ExportError(LensmithError):
    """The model cannot be exported (missing inputs, exporter or checker failure)."""


class ParityError(GateFailedError):
    """ONNX and PyTorch disagree on the test split beyond the allowed tolerance."""


# ---- metadata -----------------------------------------------------------------------------------------


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_metadata(trained: TrainedModel) -> dict[str, str]:
    """What a serving site needs to use the ONNX file alone, plus where it came from (metadata_props)."""
    meta, pre = trained.meta, trained.preprocessing
    weights = str(meta.get("weights_sha256") or sha256_json(pre.to_dict()))
    data_hash = meta.get("data_hash")
    train_params = (meta.get("params") or {}).get("train")
    return {
        META_CLASSES: json.dumps(trained.classes),
        META_PREPROCESSING: json.dumps(pre.to_dict(), sort_keys=True),
        "lensmith.input_size": f"{pre.num_channels}x{pre.image_size}x{pre.image_size}",
        "lensmith.mean": json.dumps(list(pre.mean)),
        "lensmith.std": json.dumps(list(pre.std)),
        "lensmith.resize": str(pre.resize),
        "lensmith.arch": trained.arch,
        "lensmith.version": lensmith.__version__,
        "lensmith.git_commit": str(meta.get("git_commit") or "unknown"),
        "lensmith.data_hash": str(data_hash.get("combined") if isinstance(data_hash, dict) else data_hash or "unknown"),
        "lensmith.train_params_hash": sha256_json(train_params) if train_params is not None else "unknown",
        "lensmith.weights_sha256": weights,
        META_VERSION: weights[:12],
    }


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite `path` with `metadata` as its metadata_props (other props kept)."""
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**existing, **metadata})
    onnx.save(model, str(path))


# ---- export and check -----------------------------------------------------------------------------------


def export_onnx(model: nn.Module, preprocessing: Preprocessing, target: Path, opset: int) -> Path:
    """Dynamo export to one self-contained file with a dynamic batch axis."""
    size = preprocessing.image_size
    example = torch.zeros(2, preprocessing.num_channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    model = model.to(memory_format=torch.contiguous_format).eval()
    try:
        # The exporter narrates each step on stdout; keep the CLI output to our own summary.
        with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
            program.save(str(target))
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {exc})") from None
    return target


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {exc}") from None


def save_optimized(source: Path, target: Path) -> Path:
    """ONNX Runtime's graph at ORT_ENABLE_EXTENDED (ALL adds layout changes tied to this CPU)."""
    open_session(source, level="extended", optimized_path=target)
    return target


# ---- data -------------------------------------------------------------------------------------------------


def load_split_images(layout: Layout, name: str, classes: Sequence[str], preprocessing: Preprocessing) -> SplitData:
    """The split at the model's input size, in memory (parity and calibration read it many times)."""
    data = load_split_data(layout, read_split_frame(layout, name), classes, name, preprocessing, MODEL_LABELS)
    return SplitData(np.array(data.images), data.labels, data.files)


def take(data: SplitData, limit: int, seed: int) -> SplitData:
    """At most `limit` images (0 = all), chosen with a fixed seed."""
    if limit <= 0 or limit >= len(data.labels):
        return data
    pick = np.sort(np.random.default_rng(seed).choice(len(data.labels), size=limit, replace=False))
    return SplitData(data.images[pick], data.labels[pick], [data.files[i] for i in pick])


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ---- parity and accuracy -------------------------------------------------------------------------------


def torch_logits(model: nn.Module, preprocessing: Preprocessing, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [model(preprocessing.normalize_tensor(torch.from_numpy(images[s]))).float().numpy() for s in batches(len(images), batch_size)]
        )


def onnx_logits(onnx_model: OnnxModel, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return served_logits(onnx_model.logits_uint8, images, batch_size)


def served_logits(run: Callable[[np.ndarray], Any], images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([run(images[s]) for s in batches(len(images), batch_size)])


def decision_block(params: Params, layout: Layout, trained: TrainedModel, run: Callable[[np.ndarray], Any], variant: str) -> dict[str, Any]:
    """The decision rule the served variant travels with, chosen on the whole validation split with that variant."""
    val = load_split_images(layout, "val", trained.classes, trained.preprocessing)
    probabilities = softmax(served_logits(run, val.images)) if len(val.labels) else np.zeros((0, len(trained.classes)))
    rule, figures = choose_decision_rule(params, trained.classes, probabilities, val.labels)
    return {"rule": rule.as_dict(), "validation": figures, "chosen_with": variant, "n_val": int(len(val.labels))}


@dataclass(frozen=True)
class Parity:
    n_images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    max_abs_logit: float = 0.0  # the reference's largest |logit|: float32 rounding grows with it

    def allowed_diff(self, ep: ExportParams) -> float:
        return ep.parity_max_abs_diff + ep.parity_rtol * self.max_abs_logit

    def passes(self, ep: ExportParams) -> bool:
        return self.max_abs_diff <= self.allowed_diff(ep) and self.top1_agreement >= ep.parity_min_top1_agreement


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return Parity(
        n_images=int(len(reference)),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=float((reference.argmax(1) == candidate.argmax(1)).mean()),
        max_abs_logit=float(np.abs(reference).max()),
    )


def check_parity(result: Parity, ep: ExportParams, what: str) -> None:
    if not result.passes(ep):
        raise ParityError(
            f"parity gate failed for {what} on {result.n_images} test images: max |logit diff| "
            f"{result.max_abs_diff:.3g} (allowed {result.allowed_diff(ep):.3g} = {ep.parity_max_abs_diff:g} + "
            f"{ep.parity_rtol:g} x max |logit| {result.max_abs_logit:.3g}), top-1 agreement "
            f"{result.top1_agreement:.4%} (required {ep.parity_min_top1_agreement:.2%}); the export was not written"
        )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# ---- int8 -------------------------------------------------------------------------------------------------


def calibration_reader(images: np.ndarray, preprocessing: Preprocessing, batch_size: int = 16) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class SplitReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._parts = iter(list(batches(len(images), batch_size)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            part = next(self._parts, None)
            return None if part is None else {INPUT_NAME: preprocessing.normalize(images[part])}

    return SplitReader()


def quantize_int8(source: Path, target: Path, calibration: np.ndarray, preprocessing: Preprocessing, method: str) -> Path:
    """Static int8 laid out for ONNX Runtime's fast x86 kernels (each choice measured in bench/int8_configs.py):

    - QDQ graph: ORT fuses it into QLinearConv/QLinearAdd/QGemm when the session loads it (QOperator gives the same
      runtime graph and is less portable);
    - uint8 activations x int8 weights with zero point 0: the symmetric U8S8 convolution kernels. S8S8 and U8U8 leave
      convolutions unfused or on slower kernels on AVX2 (0.8-1.1x of fp32 here);
    - per-channel scales with 7-bit weights (reduce_range): without VNNI the U8S8 kernel multiplies with VPMADDUBSW,
      whose int16 pair sums saturate with 8-bit weights (255*127*2 > 32767) and never with |w| <= 64, so the accuracy
      gated here holds on every x86 CPU; the speed is the same;
    - asymmetric activations, so each Relu folds into its convolution's output range (symmetric ones keep the Relu);
    - every convolution quantised, the 3-channel stem included: it gains little itself, but leaving it fp32 adds
      layout conversions that cost more (1.5x instead of 1.9x overall for resnet18).
    The speed needs the session at ORT_ENABLE_ALL (OnnxModel's default): its NHWC layout is what makes batches fast.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.stem + ".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
    except Exception as exc:  # pre-processing only helps; quantising the plain graph is still correct
        log.warning("quant_pre_process failed (%s); quantising the exported graph as is", exc)
        shutil.copyfile(source, prepared)
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    try:
        quantize_static(
            str(prepared),
            str(target),
            calibration_reader(calibration, preprocessing),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    except Exception as exc:
        raise ExportError(f"int8 quantisation failed ({type(exc).__name__}: {exc})") from None
    finally:
        prepared.unlink(missing_ok=True)
    return target


def runtime_op_counts(path: Path, level: str = "all") -> dict[str, int]:
    """Node types of the graph ONNX Runtime actually runs for `path` at `level`, after its fusions (most first)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="lensmith-ort-") as tmp:
        optimized = Path(tmp) / "runtime.onnx"
        open_session(path, level=level, optimized_path=optimized)
        counts: dict[str, int] = {}
        for node in onnx.load(str(optimized)).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---- speed ------------------------------------------------------------------------------------------------


def images_per_second(run: Callable[[], Any], batch_size: int, seconds: float) -> float:
    run()  # warm-up (first run allocates)
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        run()
        done += 1
    return done * batch_size / (time.perf_counter() - start)


def compare_speed(
    runners: dict[str, Callable[[np.ndarray], Any]], images: np.ndarray, batch_sizes: Sequence[int], seconds: float, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """{name: {"b1": img/s, "b32": img/s}}: medians over `rounds`, the order rotated each round (noisy machine)."""
    names = list(runners)
    samples: dict[str, dict[str, list[float]]] = {n: {f"b{b}": [] for b in batch_sizes} for n in names}
    for r in range(rounds):
        for b in batch_sizes:
            batch = np.resize(images, (b, *images.shape[1:])) if len(images) < b else images[:b]
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                samples[name][f"b{b}"].append(images_per_second(lambda: runners[name](batch), b, seconds / rounds))
    return {n: {k: float(np.median(v)) for k, v in per.items()} for n, per in samples.items()}


# ---- the stage --------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    model_dir: Path
    report: dict[str, Any]

    def __str__(self) -> str:
        r = self.report
        p = r["parity"]
        lines = [
            f"exported {r['arch']} -> {self.model_dir / ONNX_FILE} ({r['sizes_bytes']['fp32'] / 1e6:.1f} MB), provider {r['provider']}",
            f"parity on {p['n_images']} test images ({p['provider']}): max |logit diff| {p['max_abs_diff']:.2e}, "
            f"top-1 agreement {p['top1_agreement']:.2%}",
            f"fp32 test accuracy {r['accuracy']['fp32']:.4f}; {r['int8']['decision']}: {r['int8']['reason']}",
            f"serving variant: {r['serving_variant']}",
        ]
        if r.get("tensorrt"):
            from lensmith.tensorrtplan import summary_line

            lines.append(summary_line(r["tensorrt"]))
        return "\n".join(lines)


def int8_block(
    ep: ExportParams, fp32_acc: float, int8_acc: float | None, speed: dict[str, dict[str, float]], error: str | None
) -> dict[str, Any]:
    if not ep.int8:
        return {"decision": "int8 skipped", "reason": "export.int8 is false", "kept": False}
    if int8_acc is None:
        return {"decision": "int8 rejected", "reason": error or "quantisation failed", "kept": False}
    drop = fp32_acc - int8_acc
    kept = drop <= ep.int8_max_drop + 1e-12
    speedup = {k: speed["int8"][k] / speed["fp32"][k] for k in speed["fp32"]}
    return {
        "decision": "int8 kept" if kept else "int8 rejected",
        "reason": (
            f"test accuracy {int8_acc:.4f} vs fp32 {fp32_acc:.4f} (drop {drop:+.4f}, allowed {ep.int8_max_drop}); "
            f"speed-up b1 {speedup.get('b1', 0):.2f}x, b32 {speedup.get('b32', 0):.2f}x"
        ),
        "kept": kept,
        "accuracy": int8_acc,
        "accuracy_drop": drop,
        "max_drop": ep.int8_max_drop,
        "speedup": speedup,
        "calibration_method": ep.calibration_method,
        "calibration_images": ep.calibration_images,
    }


def choose_variant(int8: dict[str, Any]) -> str:
    """int8 only when kept and faster at the serving batch size on this CPU."""
    if int8.get("kept") and int8["speedup"].get(f"b{SPEED_BATCHES[-1]}", 0.0) >= INT8_FASTER_MARGIN:
        return "int8"
    return "fp32"


def run_export(params: Params, layout: Layout, tensorrt: bool = False) -> ExportSummary:
    """`tensorrt`: also build the TensorRT plan (`--tensorrt`; export.tensorrt asks for it too), see lensmith.tensorrtplan."""
    from lensmith.tensorrtplan import export_plan, tensorrt_backend

    # a missing tensorrt package or GPU fails here, before any model or image is read
    plan_backend = tensorrt_backend(params, tensorrt)
    ep = params.export
    trained = load_candidate(layout)
    pre = trained.preprocessing
    test = take(load_split_images(layout, "test", trained.classes, pre), ep.parity_max_images, ep.seed)
    metadata = model_metadata(trained)
    model_dir = layout.exported
    # the whole folder is replaced at the end, so an int8 file from an older export never survives
    with atomic_dir(model_dir) as work:
        fp32_path = export_onnx(trained.model, pre, work / ONNX_FILE, ep.opset)
        set_metadata(fp32_path, {**metadata, "lensmith.variant": "fp32"})
        check_onnx(fp32_path)
        reference = torch_logits(trained.model, pre, test.images)
        # parity on export.parity_providers (CUDA when there is one), in full float32; the rest below stays on the CPU
        fp32 = OnnxModel.load(fp32_path, ep.parity_providers, exact=True)
        fp32_logits = onnx_logits(fp32, test.images)
        fp32_parity = parity(reference, fp32_logits)
        check_parity(fp32_parity, ep, ONNX_FILE)

        opt_path = save_optimized(fp32_path, work / OPTIMIZED_FILE)
        opt = OnnxModel.load(opt_path, ["CPUExecutionProvider"])  # a CPU graph (fused CPU ops), served on the CPU only
        opt_parity = parity(reference, onnx_logits(opt, test.images))
        check_parity(opt_parity, ep, f"{OPTIMIZED_FILE} (ORT_ENABLE_EXTENDED)")

        runners: dict[str, Callable[[np.ndarray], Any]] = {"fp32": opt.logits_uint8}
        int8_acc, int8_error, int8_model, int8_ops = None, None, None, None
        if ep.int8:
            train = take(load_split_images(layout, "train", trained.classes, pre), ep.calibration_images, ep.seed)
            try:
                int8_path = quantize_int8(fp32_path, work / INT8_FILE, train.images, pre, ep.calibration_method)
                set_metadata(int8_path, {**metadata, "lensmith.variant": "int8"})
                int8_model = OnnxModel.load(int8_path, ["CPUExecutionProvider"])
                int8_acc = accuracy(onnx_logits(int8_model, test.images), test.labels)
                int8_ops = runtime_op_counts(int8_path)
                runners["int8"] = int8_model.logits_uint8
            except ExportError as exc:
                int8_error = str(exc)
        speed = compare_speed(runners, test.images, SPEED_BATCHES, ep.bench_seconds * len(runners))
        fp32_acc = accuracy(fp32_logits, test.labels)
        int8 = int8_block(ep, fp32_acc, int8_acc, speed, int8_error)
        if int8_ops is not None:  # what ORT runs: convolutions left as float Conv run no int8 kernel
            int8["runtime_ops"] = int8_ops
        served = OnnxModel.load(fp32_path, ep.providers)  # the requested providers, with fallback, for the report
        variant = choose_variant(int8)
        decision = decision_block(params, layout, trained, runners[variant], variant)
        rule_json = json.dumps(decision["rule"], sort_keys=True)
        for path in (fp32_path, opt_path, work / INT8_FILE):
            if path.exists():  # every file carries the rule, whichever one a site serves
                set_metadata(path, {META_DECISION: rule_json})

        report = {
            "arch": trained.arch,
            "model_version": metadata[META_VERSION],
            "metadata": metadata,
            "opset": ep.opset,
            "files": {"fp32": ONNX_FILE, "optimized": OPTIMIZED_FILE, "int8": INT8_FILE if int8["kept"] else None},
            "parity": {
                **fp32_parity.__dict__,
                "provider": fp32.provider,
                "providers_requested": ep.parity_providers,
                "optimized": {**opt_parity.__dict__, "provider": opt.provider},
                "max_allowed": fp32_parity.allowed_diff(ep),
            },
            "accuracy": {"fp32": fp32_acc, "int8": int8_acc, "n_test": int(len(test.labels))},
            "int8": int8,
            "sizes_bytes": {k: p.stat().st_size for k, p in (("fp32", fp32_path), ("optimized", opt_path))}
            | ({"int8": (work / INT8_FILE).stat().st_size} if int8_acc is not None else {}),
            "images_per_s": speed,
            "latency_ms_b1": {k: 1000.0 / v["b1"] for k, v in speed.items()},
            "provider": served.provider,
            "providers_requested": list(ep.providers),
            "serving_variant": variant,
            "decision": decision,
        }
        del fp32, opt, int8_model, served  # release the sessions before their files move
        if not int8["kept"]:
            (work / INT8_FILE).unlink(missing_ok=True)
        if plan_backend is not None:  # gated like model.onnx: a failure discards this folder, the old export stays
            report["tensorrt"] = export_plan(plan_backend, params, fp32_path, work, test.images, reference, pre, test.labels)
        write_json_atomic(work / EXPORT_JSON, report)
    write_json_atomic(layout.reports / EXPORT_JSON, report)
    return ExportSummary(model_dir=model_dir, report=report)
