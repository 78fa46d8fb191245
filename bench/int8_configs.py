"""Which static-int8 configuration is fast on this CPU, and how fast int8 can be at all.

    .venv/bin/python bench/int8_configs.py [--root .cache/bench/inference/resnet18-128px-1000] [--seconds 3] [--rounds 3]
    .venv/bin/python bench/int8_configs.py --conv-only     # the single-convolution ceiling only

Part 1 (needs a model trained by bench/inference.py under --root): quantises the exported fp32 graph
with several ONNX Runtime configurations (QDQ vs QOperator, U8S8 / S8S8 / U8U8, per-channel or not,
reduce_range, symmetric activations), scores each on the real test split and measures images/s at batch
1 and 32 against the fp32 graph in one run (rotating order, medians), at ORT_ENABLE_ALL and EXTENDED.

Part 2: a single Conv+Relu of each ResNet-18 stage shape (at a 128 px input) in fp32 vs int8 QDQ,
in GFLOP/s: the ceiling a whole int8 network can approach on this CPU's instruction set.

Part 3 (--sizes 64 128 160 224): resnet18 with random weights at each input size, fp32 vs the int8 that
`lensmith export` makes, to see whether the ratio depends on how conv-bound the network is.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.export import INPUT_NAME, accuracy, calibration_reader, compare_speed, load_split_images, onnx_logits, take  # noqa: E402
from lensmith.layout import Layout  # noqa: E402
from lensmith.onnxmodel import OnnxModel, session_options  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    fmt: str = "QDQ"
    activation: str = "QUInt8"
    weight: str = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    float_stem: bool = False  # leave the first Conv (3 input channels) in fp32


CONFIGS = [
    Config("qdq_u8s8_pc"),  # the export default before this sweep
    Config("qdq_u8s8_pc_rr", reduce_range=True),
    Config("qdq_u8s8_pt", per_channel=False),
    Config("qdq_u8s8_pt_rr", per_channel=False, reduce_range=True),
    Config("qdq_s8s8_pc", activation="QInt8"),
    Config("qdq_u8u8_pc", weight="QUInt8"),
    Config("qdq_u8s8_pc_actsym", extra={"ActivationSymmetric": True}),
    Config("qop_u8s8_pc", fmt="QOperator"),
    Config("qdq_u8s8_pc_fp32stem", float_stem=True),
    Config("qdq_u8s8_pc_rr_fp32stem", reduce_range=True, float_stem=True),
]


def first_conv(path: Path) -> str:
    import onnx

    return next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")


def quantize(source: Path, target: Path, config: Config, calibration: np.ndarray, pre: Any) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(target),
        calibration_reader(calibration, pre),
        quant_format=getattr(QuantFormat, config.fmt),
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=getattr(QuantType, config.activation),
        weight_type=getattr(QuantType, config.weight),
        extra_options=dict(config.extra),
        nodes_to_exclude=[first_conv(source)] if config.float_stem else None,
    )
    return target


def op_histogram(path: Path, level: str) -> dict[str, int]:
    """Node types of the graph ONNX Runtime actually runs at `level`."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "g.onnx"
        ort.InferenceSession(str(path), session_options(optimized_path=out, level=level), providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(str(out)).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def whole_model(args: argparse.Namespace) -> None:
    from lensmith.modelio import load_trained
    from onnxruntime.quantization.shape_inference import quant_pre_process

    layout = Layout(args.root.resolve())
    trained = load_trained(layout.candidate)
    pre = trained.preprocessing
    fp32_path = layout.exported / "model.onnx"
    opt_path = layout.exported / "model.opt.onnx"
    if not fp32_path.is_file():
        raise SystemExit(f"no {fp32_path}: run bench/inference.py first")
    test = load_split_images(layout, "test", trained.classes, pre)
    calib = take(load_split_images(layout, "train", trained.classes, pre), 256, 0).images
    work = Path(tempfile.mkdtemp(prefix="int8cfg-"))
    prepared = work / "pre.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)

    fp32 = OnnxModel.load(opt_path)
    fp32_acc = accuracy(onnx_logits(fp32, test.images), test.labels)
    print(f"{trained.arch} @ {pre.image_size}px, {len(test.labels)} test images, ORT {ort.__version__}; fp32 test accuracy {fp32_acc:.4f}")
    print(f"fp32 ops at ALL: {op_histogram(opt_path, 'all')}")

    runners: dict[str, Any] = {"fp32": fp32.logits_uint8}
    accs: dict[str, float] = {}
    wanted = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    for config in wanted:
        target = work / f"{config.name}.onnx"
        started = time.perf_counter()
        try:
            quantize(prepared, target, config, calib, pre)
            model = OnnxModel.load(target)
        except Exception as exc:  # a configuration ORT cannot build or run is a result too
            print(f"{config.name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        accs[config.name] = accuracy(onnx_logits(model, test.images), test.labels)
        runners[config.name] = model.logits_uint8
        print(f"{config.name}: quantised in {time.perf_counter() - started:.1f}s; accuracy {accs[config.name]:.4f}; ops at ALL: {op_histogram(target, 'all')}")
        if config.name == wanted[0].name:
            ext = OnnxModel(
                session=ort.InferenceSession(str(target), session_options(level="extended"), providers=["CPUExecutionProvider"]),
                path=target, classes=model.classes, preprocessing=pre, metadata=model.metadata,
            )
            runners[f"{config.name}@extended"] = ext.logits_uint8
            print(f"{config.name} ops at EXTENDED: {op_histogram(target, 'extended')}")
            one = OnnxModel.load(target, threads=1)
            runners[f"{config.name}@1thread"] = one.logits_uint8
            runners["fp32@1thread"] = OnnxModel.load(opt_path, threads=1).logits_uint8

    speed = compare_speed(runners, test.images, (1, 32), args.seconds, args.rounds)
    print(f"\nimages/s, median of {args.rounds} rotated rounds; ratios vs fp32 with the same thread count")
    print(f"{'variant':<28} {'acc':>7} {'b1':>8} {'b32':>8} {'x b1':>6} {'x b32':>6}")
    for name, per in speed.items():
        base = speed["fp32@1thread" if name.endswith("@1thread") else "fp32"]
        acc = accs.get(name.split("@")[0], fp32_acc if name.startswith("fp32") else float("nan"))
        print(f"{name:<28} {acc:>7.4f} {per['b1']:>8.1f} {per['b32']:>8.1f} {per['b1'] / base['b1']:>6.2f} {per['b32'] / base['b32']:>6.2f}")


# ---- part 2: one convolution ---------------------------------------------------------------------------

# (name, in channels, out channels, kernel, stride, input side) of ResNet-18 at a 128 px input
CONV_SHAPES = [
    ("stem 3->64 7x7/2 @128", 3, 64, 7, 2, 128),
    ("layer1 64->64 3x3 @32", 64, 64, 3, 1, 32),
    ("layer2 128->128 3x3 @16", 128, 128, 3, 1, 16),
    ("layer3 256->256 3x3 @8", 256, 256, 3, 1, 8),
    ("layer4 512->512 3x3 @4", 512, 512, 3, 1, 4),
]


def conv_graph(path: Path, cin: int, cout: int, k: int, stride: int, side: int, seed: int) -> float:
    """One Conv+Relu with He-initialised weights; returns its GFLOP per image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
    pad = k // 2
    out_side = (side + 2 * pad - k) // stride + 1
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", cin, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cout, out_side, out_side])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return 2.0 * cin * cout * k * k * out_side * out_side / 1e9


def conv_ceiling(args: argparse.Namespace) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    work = Path(tempfile.mkdtemp(prefix="int8conv-"))
    threads = args.threads or os.cpu_count() or 1
    print(f"\nsingle Conv+Relu, fp32 vs int8 QDQ U8S8 per-channel (ORT {ort.__version__}, ORT_ENABLE_ALL, {threads} threads); GFLOP/s, median of {args.rounds}")
    print(f"{'shape':<26} {'batch':>5} {'fp32':>8} {'int8':>8} {'int8 rr':>8} {'x':>6} {'x rr':>6}")
    for i, (name, cin, cout, k, stride, side) in enumerate(CONV_SHAPES):
        fp32_path = work / f"conv{i}.onnx"
        gflop = conv_graph(fp32_path, cin, cout, k, stride, side, seed=i)
        rng = np.random.default_rng(100 + i)
        calib = [rng.standard_normal((4, cin, side, side)).astype(np.float32) for _ in range(4)]
        paths = {"fp32": fp32_path}
        for tag, rr in (("int8", False), ("int8 rr", True)):

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(calib)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    x = next(self._it, None)
                    return None if x is None else {"x": x}

            paths[tag] = work / f"conv{i}_{tag.replace(' ', '_')}.onnx"
            quantize_static(str(fp32_path), str(paths[tag]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=rr, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        sessions = {t: ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"]) for t, p in paths.items()}
        for batch in (1, 32):
            x = rng.standard_normal((batch, cin, side, side)).astype(np.float32)
            runners = {t: (lambda s: lambda _b: s.run(None, {"x": x}))(s) for t, s in sessions.items()}
            per = compare_speed(runners, x, (batch,), args.seconds, args.rounds)
            g = {t: per[t][f"b{batch}"] * gflop for t in per}
            print(f"{name:<26} {batch:>5} {g['fp32']:>8.1f} {g['int8']:>8.1f} {g['int8 rr']:>8.1f} {g['int8'] / g['fp32']:>6.2f} {g['int8 rr'] / g['fp32']:>6.2f}")


# ---- part 3: input size ---------------------------------------------------------------------------------


def size_sweep(args: argparse.Namespace) -> None:
    """resnet18 (random weights: speed does not depend on them) exported at each size, int8 as `lensmith export` makes it."""
    import torch

    from lensmith.export import export_onnx, quantize_int8, save_optimized
    from lensmith.models import build_model, preprocessing_for

    work = Path(tempfile.mkdtemp(prefix="int8size-"))
    rng = np.random.default_rng(0)
    print(f"\nresnet18 (random init) by input size: fp32 (EXTENDED graph) vs lensmith's int8, ORT_ENABLE_ALL; images/s, median of {args.rounds}")
    print(f"{'size':>5} {'fp32 b1':>9} {'int8 b1':>9} {'x b1':>6} {'fp32 b32':>9} {'int8 b32':>9} {'x b32':>6}")
    for size in args.sizes:
        torch.manual_seed(0)
        model = build_model("resnet18", 5, pretrained=False, dropout=0.0, image_size=size).eval()
        pre = preprocessing_for("resnet18", size)
        fp32 = export_onnx(model, pre, work / f"r18_{size}.onnx", 18)
        opt = save_optimized(fp32, work / f"r18_{size}.opt.onnx")
        calib = rng.integers(0, 256, (64, 3, size, size), dtype=np.uint8)
        int8 = quantize_int8(fp32, work / f"r18_{size}.int8.onnx", calib, pre, "minmax")
        sessions = {t: ort.InferenceSession(str(p), session_options(), providers=["CPUExecutionProvider"]) for t, p in (("fp32", opt), ("int8", int8))}
        images = rng.integers(0, 256, (32, 3, size, size), dtype=np.uint8)
        runners = {t: (lambda s: lambda b: s.run(None, {INPUT_NAME: pre.normalize(b)}))(s) for t, s in sessions.items()}
        per = compare_speed(runners, images, (1, 32), args.seconds, args.rounds)
        f, i = per["fp32"], per["int8"]
        print(f"{size:>5} {f['b1']:>9.1f} {i['b1']:>9.1f} {i['b1'] / f['b1']:>6.2f} {f['b32']:>9.1f} {i['b32']:>9.1f} {i['b32'] / f['b32']:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".cache/bench/inference/resnet18-128px-1000"), help="a project bench/inference.py trained and exported")
    parser.add_argument("--seconds", type=float, default=3.0, help="per variant and batch size, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=[], help=f"subset of {[c.name for c in CONFIGS]}")
    parser.add_argument("--threads", type=int, default=0, help="ORT threads for the single-convolution part; 0 = all cores")
    parser.add_argument("--conv-only", action="store_true")
    parser.add_argument("--no-conv", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="also time resnet18 at these input sizes (part 3)")
    parser.add_argument("--sizes-only", action="store_true")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" advice, once per model
    if not (args.conv_only or args.sizes_only):
        whole_model(args)
    if not (args.no_conv or args.sizes_only):
        conv_ceiling(args)
    if args.sizes:
        size_sweep(args)


if __name__ == "__main__":
    main()
