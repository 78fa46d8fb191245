"""The GPU check (issue #20), in one go: demo data -> CUDA training -> export + parity -> evaluation -> the
speed ceiling -> torch.compile -> the CPU reference, written as one JSON summary (gpu_check.json).

Run it through bench/gpu_check.sh, which installs the wheels carried with the working tree first (a GPU
machine without network has torch, torchvision, onnx and a CPU onnxruntime, not the rest of Lensmith's
stack). It calls the real stage functions (lensmith.stages) on a throwaway project; only dvclive's metric
logger is replaced (its dependency tree is DVC's; the check reads the epochs from the training history).

Measured:
- the CUDA-only tests of tests/test_batches.py and tests/test_train.py (no stall of the GPU inside an epoch);
- training: images/s per epoch (augmentation, host->device copies and all) and the GPU's utilisation
  (NVML, sampled every 100 ms) inside the training epochs, i.e. between each epoch's first and last step;
- the ceiling: a plain loop of the same model, batch, image size, precision, memory format and optimizer on
  batches that already sit on the GPU (no data, no augmentation): what the GPU can do for this model;
- torch.compile: the seconds per epoch after the first compiled epoch, against the eager run's;
- the exported ONNX model against the trained model on the whole test split (top-1 agreement, max logit
  difference), with the provider that ran it;
- test accuracy of the CUDA-trained model against the same training on the CPU;
- last, when time is left and not judged: CUDA training at batch 256 (how much a larger batch fills the GPU).

Without CUDA it is a dry run on the CPU: the same steps on a tiny demo, so the script itself stays tested
(tests/test_gpu_check.py); utilisation figures are null and no target is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LARGE_BATCH = 256
TARGETS = {"gpu_utilisation": 0.80, "ceiling_ratio": 0.80, "accuracy_points": 1.0, "onnx_top1_agreement": 1.0}


# ---- measuring ---------------------------------------------------------------------------------------------


class UtilisationSampler:
    """NVML's GPU utilisation (share of time a kernel ran) sampled on a thread, with timestamps."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> UtilisationSampler:
        self._stop.clear()  # entered again for a later step: samples accumulate, timestamps tell them apart
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        except Exception as exc:  # no NVML: the figures are null and say why
            self.error = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return self

        def sample() -> None:
            while not self._stop.wait(self.period_s):
                self.samples.append((time.perf_counter(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0))

        self._thread = threading.Thread(target=sample, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean_within(self, windows: list[tuple[float, float]]) -> float | None:
        inside = [u for t, u in self.samples if any(a <= t <= b for a, b in windows)]
        return round(statistics.fmean(inside), 3) if inside else None


@contextmanager
def epoch_windows(train_module: Any) -> Iterator[list[tuple[float, float]]]:
    """(start, end) perf_counter times of every train_one_epoch call while the block runs."""
    windows: list[tuple[float, float]] = []
    real = train_module.train_one_epoch

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            windows.append((start, time.perf_counter()))

    train_module.train_one_epoch = timed
    try:
        yield windows
    finally:
        train_module.train_one_epoch = real


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), compute_capability=f"{props.major}.{props.minor}")
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:
            env["driver"] = f"unknown ({type(exc).__name__})"
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    return env


# ---- the steps ---------------------------------------------------------------------------------------------


def prepare_project(workdir: Path, overrides: list[str]) -> tuple[Any, Any]:
    """A throwaway project with the repository's params.yaml and the demo data, ingested and split."""
    from lensmith.layout import Layout
    from lensmith.params import load_params
    from lensmith.split import run_split
    from lensmith.stages import run_stage

    workdir.mkdir(parents=True, exist_ok=True)
    params = load_params(REPO / "params.yaml", overrides)
    layout = Layout(workdir)
    for stage in ("demo_data", "ingest"):
        run_stage(stage, params, layout)
    run_split(params, layout)  # without the leakage gate: it is Great Expectations' (validate), not on GPU machines
    return params, layout


def no_dvclive(train_module: Any) -> None:
    from lensmith import distributed

    train_module.open_live = lambda layout, resume: distributed.NoLive()


def test_accuracy(layout: Any, model_dir: Path, device: str) -> float:
    """Top-1 accuracy of the trained model in `model_dir` on the test split (torch, fp32, on `device`)."""
    import numpy as np

    from lensmith.inference import predict_logits_uint8
    from lensmith.modelio import load_trained
    from lensmith.split import read_split_frame
    from lensmith.splitdata import MODEL_LABELS, load_split_data

    trained = load_trained(model_dir, device)
    trained.model.eval()
    frame = read_split_frame(layout, "test", needed_for="the GPU check's accuracy")
    data = load_split_data(layout, frame, trained.classes, "test", trained.preprocessing, MODEL_LABELS)
    logits = predict_logits_uint8(trained.model, trained.preprocessing, np.asarray(data.images), 256, device)
    return float((logits.argmax(1) == data.labels).mean())


def training_block(summary: Any, meta: dict[str, Any], windows: list[tuple[float, float]], sampler: UtilisationSampler | None, freeze_epochs: int) -> dict[str, Any]:
    """Per-epoch figures; 'steady' = the epochs after the first one that trains the whole network."""
    history = meta["history"]
    epochs = []
    for i, h in enumerate(history):
        window = windows[i] if i < len(windows) else None
        epochs.append({
            "epoch": h["epoch"],
            "seconds": round(h["train_seconds"], 3),
            "images_per_s": round(h["train_images_per_second"], 1),
            "gpu_utilisation": sampler.mean_within([window]) if sampler and window else None,
        })
    steady = [e for e in epochs if e["epoch"] > freeze_epochs + 1] or epochs[-1:]
    steady_windows = [windows[e["epoch"] - 1] for e in steady if e["epoch"] - 1 < len(windows)]
    return {
        "epochs": epochs,
        "steady_epochs": [e["epoch"] for e in steady],
        "steady_images_per_s": round(statistics.median(e["images_per_s"] for e in steady), 1),
        "steady_seconds_per_epoch": round(statistics.median(e["seconds"] for e in steady), 3),
        "gpu_utilisation_training": sampler.mean_within(steady_windows) if sampler else None,
        "total_seconds": round(summary.seconds, 1),
        "best_epoch": summary.best_epoch,
        "device": meta.get("device"),
        "device_name": meta.get("device_name"),
        "compiled": meta.get("compiled"),
    }


def train_run(params: Any, layout: Any, sampler: UtilisationSampler | None, copy_to: str) -> dict[str, Any]:
    """run_train with these params; the candidate folder is kept as models/<copy_to> for later steps."""
    import shutil

    from lensmith import train as train_module
    from lensmith.modelio import META_FILE

    with epoch_windows(train_module) as windows:
        summary = train_module.run_train(params, layout)
    meta = json.loads((layout.candidate / META_FILE).read_text())
    target = layout.root / "models" / copy_to
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(layout.candidate, target)
    return training_block(summary, meta, windows, sampler, params.train.freeze_epochs)


def synthetic_ceiling(params: Any, num_classes: int, device_name: str, seconds: float, sampler: UtilisationSampler | None) -> dict[str, Any]:
    """Training steps of the same model/batch/size/precision/optimizer on batches already on the device."""
    import torch
    from torch import nn

    from lensmith import train as train_module
    from lensmith.models import build_model, set_backbone_trainable

    tp = params.train
    device = torch.device(device_name)
    if device.type == "cuda":
        train_module.configure_cuda()
    model = build_model(tp.model, num_classes, False, tp.dropout, tp.image_size).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_backbone_trainable(model, True)
    model.train()
    optimizer = train_module.build_optimizer(model, tp, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    batches = [torch.randn(tp.batch_size, 3, tp.image_size, tp.image_size, device=device) for _ in range(4)]
    if tp.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    targets = torch.randint(0, num_classes, (tp.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and tp.amp)

    def step(i: int) -> None:
        with autocast:
            loss = criterion(model(batches[i % len(batches)]).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tp.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(10):
        step(i)
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            step(steps)
            steps += 1
        sync()
    end = time.perf_counter()
    return {
        "images_per_s": round(steps * tp.batch_size / (end - start), 1),
        "steps": steps,
        "gpu_utilisation": sampler.mean_within([(start, end)]) if sampler else None,
    }


def export_block(params: Any, layout: Any) -> dict[str, Any]:
    from lensmith.stages import run_stage

    start = time.perf_counter()
    run_stage("export", params, layout)
    report = json.loads((layout.reports / "export.json").read_text())
    parity = report["parity"]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "top1_agreement": parity.get("top1_agreement"),
        "max_abs_diff": parity.get("max_abs_diff"),
        "n": parity.get("n_images"),
        "provider": report.get("parity_provider") or parity.get("provider") or report.get("provider"),
        "serving_variant": report.get("serving_variant"),
        "tensorrt": report.get("tensorrt"),
    }


def evaluate_block(params: Any, layout: Any) -> dict[str, Any]:
    from lensmith.stages import run_stage

    start = time.perf_counter()
    run_stage("evaluate", params, layout)
    metrics = json.loads(layout.metrics_json.read_text())
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "accuracy": metrics["test"]["accuracy"],
        "n": metrics["test"]["n"],
        "provider": metrics.get("served", {}).get("provider"),
        "images_per_s": metrics.get("throughput", {}).get("images_per_s"),
    }


GPU_TESTS = ["tests/test_batches.py", "tests/test_train.py"]


def gpu_tests() -> dict[str, Any]:
    """The CUDA-only tests (pinned batches reach the GPU intact; an epoch waits for the GPU only at its periodic
    checks), run with pytest in a subprocess; skipped without CUDA, as in CI."""
    import re
    import subprocess

    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-rs", "-k", "cuda or pinned", *GPU_TESTS]
    # no plugins: the machine's own (or, here, the dev tools') pytest plugins have nothing to do with these tests
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", done.stdout)}
    return {"returncode": done.returncode, "counts": counts, "tail": done.stdout[-1500:]}


def judged(value: float | None, target: float, at_least: bool = True, dry_run: bool = False) -> dict[str, Any]:
    met = None if value is None or dry_run else (value >= target if at_least else value <= target)
    return {"value": value, "target": (">= " if at_least else "<= ") + str(target), "met": met}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    cuda, ceiling = result.get("train_cuda", {}), result.get("ceiling", {})
    ratio = None
    if cuda.get("steady_images_per_s") and ceiling.get("images_per_s"):
        ratio = round(cuda["steady_images_per_s"] / ceiling["images_per_s"], 3)
    points = None
    if result.get("accuracy", {}).get("cuda") is not None and result["accuracy"].get("cpu") is not None:
        points = round(abs(result["accuracy"]["cuda"] - result["accuracy"]["cpu"]) * 100, 2)
    compiled = result.get("train_compiled", {})
    faster = None
    if compiled.get("steady_seconds_per_epoch") and cuda.get("steady_seconds_per_epoch"):
        faster = round(cuda["steady_seconds_per_epoch"] / compiled["steady_seconds_per_epoch"], 3)
    dry = bool(result.get("dry_run"))  # the figures of a tiny CPU run judge nothing
    return {
        "gpu_utilisation": judged(cuda.get("gpu_utilisation_training"), TARGETS["gpu_utilisation"], dry_run=dry),
        "ceiling_ratio": judged(ratio, TARGETS["ceiling_ratio"], dry_run=dry),
        "accuracy_points_vs_cpu": judged(points, TARGETS["accuracy_points"], at_least=False, dry_run=dry),
        "onnx_top1_agreement": judged(result.get("export", {}).get("top1_agreement"), TARGETS["onnx_top1_agreement"], dry_run=dry),
        "compile_speedup_per_epoch": judged(faster, 1.0, dry_run=dry),
        "cuda_tests_passed": judged(result.get("gpu_tests", {}).get("counts", {}).get("passed"), 2, dry_run=dry),
    }


# ---- main --------------------------------------------------------------------------------------------------


def step(result: dict[str, Any], name: str, deadline: float, run: Callable[[], Any], out: Path) -> None:
    """Run one step into result[name]; a failure or the deadline is recorded and the check goes on."""
    if time.monotonic() > deadline:
        result[name] = {"skipped": "the check's time budget ran out before this step"}
    else:
        started = time.perf_counter()
        try:
            result[name] = run()
        except Exception as exc:  # the summary must still be written: say what failed and carry on
            import traceback

            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        print(f"[gpu-check] {name}: {time.perf_counter() - started:.1f}s", flush=True)
    write_summary(result, out)


def write_summary(result: dict[str, Any], out: Path) -> None:
    result["targets"] = targets(result)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "reports" / "gpu_check"))
    parser.add_argument("--workdir", type=Path, default=None, help="project folder (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=390.0, help="no new step starts after this many seconds")
    parser.add_argument("--ceiling-s", type=float, default=None, help="seconds of the synthetic-batch loop (15; 3 in a dry run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU run of every step (automatic without CUDA)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["compile", "cpu", "evaluate", "large-batch"], help="steps to leave out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="params override, as `lensmith --set`")
    return parser.parse_args(argv)


DRY_RUN_OVERRIDES = [
    "demo.per_class=32", "demo.image_size=64", "train.image_size=64", "train.epochs=3", "train.batch_size=16",
    "train.bn_recalibration_images=64", "export.bench_seconds=0.2", "export.calibration_images=32",
]


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    dry_run = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry_run else "cuda"
    env = environment()
    # a TensorRT plan (`lensmith export --tensorrt`) is built and gated too where the tensorrt package is there
    plan = ["export.tensorrt=true"] if env["tensorrt"] and not dry_run else []
    overrides = [*(DRY_RUN_OVERRIDES if dry_run else []), f"train.device={device}", *plan, *args.overrides]
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "overrides": overrides,
        "environment": env,
    }
    from lensmith import train as train_module

    no_dvclive(train_module)
    if dry_run:  # the compiled path's graph capture and guards, without Inductor's C++ code generation
        train_module.COMPILE_CPU_BACKEND = "eager"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lensmith-gpu-check-"))
    holder: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        params, layout = prepare_project(workdir, overrides)
        holder.update(params=params, layout=layout)
        counts = {n: int(len(__import__("pandas").read_parquet(layout.split_file(n)))) for n in ("train", "val", "test")}
        return {"workdir": str(workdir), "images": counts}

    step(result, "data", deadline, prepare, args.out)
    if "params" not in holder:
        return 1
    params, layout = holder["params"], holder["layout"]
    step(result, "gpu_tests", deadline, gpu_tests, args.out)
    sampler = None if dry_run else UtilisationSampler()
    with sampler if sampler is not None else nullcontext():
        step(result, "train_cuda", deadline, lambda: train_run(params, layout, sampler, "trained_cuda"), args.out)
        accuracy: dict[str, Any] = {}
        result["accuracy"] = accuracy
        trained_cuda = layout.root / "models" / "trained_cuda"
        if "error" not in result["train_cuda"]:
            step(result, "accuracy_cuda", deadline, lambda: accuracy.update(cuda=test_accuracy(layout, trained_cuda, device)) or dict(accuracy), args.out)
            step(result, "export", deadline, lambda: export_block(params, layout), args.out)
            if "evaluate" not in args.skip:
                step(result, "evaluate", deadline, lambda: evaluate_block(params, layout), args.out)
        meta = trained_cuda / "meta.json"
        classes = len(json.loads(meta.read_text())["classes"]) if meta.is_file() else 2
        ceiling_s = args.ceiling_s if args.ceiling_s is not None else (3.0 if dry_run else 15.0)
        step(result, "ceiling", deadline, lambda: synthetic_ceiling(params, classes, device, ceiling_s, sampler), args.out)
        if "compile" not in args.skip:
            compiled = params.model_copy(update={"train": params.train.model_copy(update={"compile": True})})
            step(result, "train_compiled", deadline, lambda: train_run(compiled, layout, sampler, "trained_compiled"), args.out)
    if "cpu" not in args.skip:
        cpu = params.model_copy(update={"train": params.train.model_copy(update={"device": "cpu"})})

        def cpu_run() -> dict[str, Any]:
            block = train_run(cpu, layout, None, "trained_cpu")
            accuracy["cpu"] = test_accuracy(layout, layout.root / "models" / "trained_cpu", "cpu")
            return block

        step(result, "train_cpu", deadline, cpu_run, args.out)
    if "large-batch" not in args.skip and not dry_run:
        # not a target: where the demo's batch leaves the GPU waiting on kernel launches, how much a larger one fills it
        large = params.model_copy(update={"train": params.train.model_copy(update={"batch_size": LARGE_BATCH})})
        with sampler if sampler is not None else nullcontext():
            step(result, "train_cuda_large_batch", deadline, lambda: train_run(large, layout, sampler, "trained_large_batch"), args.out)
    result["seconds"] = round(time.monotonic() - started, 1)
    write_summary(result, args.out)
    print(json.dumps(result["targets"], indent=2))
    failed = [k for k in ("data", "train_cuda", "export", "ceiling") if "error" in result.get(k, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
