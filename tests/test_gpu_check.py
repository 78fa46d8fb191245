"""bench/gpu_check.sh's dry run, as a GPU machine without network would run it: every package of the lock that
the GPU machine's image lacks (and bench/gpu_wheels.txt does not carry) is blocked from import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The GPU machine's image ('cuda', as read on 2026-11-17 from the device tool's KINDS.md): distributions installed.
DEVICE_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> set[str]:
    lines = (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines()
    return {normalized(line.split("==")[0].strip()) for line in lines if line.strip() and not line.startswith("#")}


def with_requirements(names: set[str]) -> set[str]:
    """`names` and what they require (no extras), transitively, as installed here: an image that holds
    pandas holds what its pandas needs."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [normalized(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen


def blocked_modules() -> set[str]:
    """Top-level import names of installed distributions the GPU machine will not have."""
    allowed = with_requirements({normalized(n) for n in DEVICE_IMAGE} | carried()) | {"lensmith"}
    allowed_names: set[str] = set()
    blocked: set[str] = set()
    for module, dists in metadata.packages_distributions().items():
        if any(normalized(d) in allowed for d in dists):
            allowed_names.add(module)
        else:
            blocked.add(module)
    return {m for m in blocked - allowed_names if m not in sys.stdlib_module_names and not m.startswith("_")}


BLOCKER = '''import sys
BLOCKED = set({blocked!r})
class GpuMachineImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine: carry it in bench/gpu_wheels.txt)")
        return None
sys.meta_path.insert(0, GpuMachineImports())
'''


@pytest.fixture(scope="module")
def gpu_machine_imports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("gpu-machine-imports")
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked_modules())))
    # no carried wheels: they are CPython 3.12 builds for the GPU machine; this venv has their packages
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHON": sys.executable, "GPU_CHECK_WHEELS": ""}
    env.pop("OUT", None)
    return env


def test_the_blocker_blocks_what_the_gpu_machine_lacks(gpu_machine_imports: dict[str, str]) -> None:
    blocked = blocked_modules()
    assert {"prefect", "dvc", "dvclive", "great_expectations", "evidently", "fastapi", "boto3"} <= blocked
    assert not {"torch", "onnxruntime", "pydantic", "numpy", "efficientnet_lite_pytorch"} & blocked
    probe = subprocess.run([sys.executable, "-c", "import prefect"], env=gpu_machine_imports, capture_output=True, text=True)
    assert probe.returncode != 0 and "not on the GPU machine" in probe.stderr


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_step_with_the_gpu_machines_packages(
    gpu_machine_imports: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out), "--workdir", str(tmp_path / "project")],
        env=gpu_machine_imports, capture_output=True, text=True, timeout=900,
    )
    assert (out / "gpu_check.json").is_file(), done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    failed = {k: v["error"] for k, v in summary.items() if isinstance(v, dict) and "error" in v}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:], done.stderr[-3000:])
    assert summary["dry_run"] is True and summary["environment"]["cuda_available"] is False
    for step in ("data", "train_cuda", "export", "evaluate", "ceiling", "train_compiled", "train_cpu"):
        assert step in summary and "skipped" not in summary[step], step
    assert summary["gpu_tests"]["returncode"] == 0 and summary["gpu_tests"]["counts"].get("skipped", 0) >= 2  # no CUDA here
    assert summary["train_compiled"]["compiled"] is True and summary["train_cuda"]["compiled"] is False
    assert summary["export"]["top1_agreement"] == 1.0 and summary["export"]["provider"] == "CPUExecutionProvider"
    assert summary["ceiling"]["images_per_s"] > 0 and summary["train_cuda"]["steady_images_per_s"] > 0
    assert set(summary["accuracy"]) == {"cuda", "cpu"}  # "cuda" = the check's device, the CPU in a dry run
    assert all(t["met"] is None for t in summary["targets"].values())  # a dry run judges no target
    assert summary["targets"]["onnx_top1_agreement"]["value"] == 1.0


def gpu_check_module() -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_check


def test_utilisation_is_averaged_inside_the_epochs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    gc = gpu_check_module()
    busy = {"value": 90}
    fake = SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=busy["value"]),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = gc.UtilisationSampler(period_s=0.005)
    with sampler:
        epoch = (time.perf_counter(), None)
        time.sleep(0.08)
        epoch = (epoch[0], time.perf_counter())
        busy["value"] = 10  # evaluation, checkpoints: between the epochs
        time.sleep(0.08)
    with sampler:  # a later step enters the same sampler again
        later = time.perf_counter()
        time.sleep(0.08)
    assert sampler.mean_within([epoch]) == pytest.approx(0.9)
    assert sampler.mean_within([(epoch[1] + 0.02, later - 0.001)]) == pytest.approx(0.1)
    assert sampler.mean_within([(later, time.perf_counter())]) == pytest.approx(0.1)


def test_targets_are_judged_from_the_measured_blocks_and_never_in_a_dry_run() -> None:
    gc = gpu_check_module()
    result = {
        "train_cuda": {"steady_images_per_s": 850.0, "steady_seconds_per_epoch": 2.0, "gpu_utilisation_training": 0.78},
        "ceiling": {"images_per_s": 1000.0},
        "train_compiled": {"steady_seconds_per_epoch": 1.6},
        "accuracy": {"cuda": 0.962, "cpu": 0.975},
        "export": {"top1_agreement": 1.0},
        "gpu_tests": {"counts": {"passed": 2}},
    }
    judged = gc.targets(result)
    assert judged["ceiling_ratio"] == {"value": 0.85, "target": ">= 0.8", "met": True}
    assert judged["gpu_utilisation"]["met"] is False
    assert judged["accuracy_points_vs_cpu"]["value"] == pytest.approx(1.3) and judged["accuracy_points_vs_cpu"]["met"] is False
    assert judged["compile_speedup_per_epoch"]["value"] == pytest.approx(1.25) and judged["compile_speedup_per_epoch"]["met"]
    assert judged["onnx_top1_agreement"]["met"] and judged["cuda_tests_passed"]["met"]
    assert all(t["met"] is None for t in gc.targets({**result, "dry_run": True}).values())
    assert gc.targets({})["ceiling_ratio"]["met"] is None  # nothing measured: nothing judged
