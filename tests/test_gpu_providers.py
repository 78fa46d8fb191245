"""The measuring stages' provider policy (evaluate.providers, export.parity_providers, drift.providers): "auto" asks
for CUDA then CPU when onnxruntime offers CUDA, never TensorRT; their CUDA sessions run in full float32 (use_tf32=0)
while serving keeps ORT's defaults; on a GPU provider the fp32 graph runs and the drift embeddings run in turn.

This machine has no GPU: a CUDA-capable onnxruntime is faked by patching `get_available_providers`, and sessions by a
stand-in that records what ONNX Runtime was asked for. `RecordingSession` runs the real graph on the CPU and
reports the first provider it was asked for, so a stage runs end to end "on CUDA" and its wiring can be checked."""

from __future__ import annotations

import json
import os
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from servekit import copy_project, exported_project, tiny_params

import lensmith.evaluate as ev
from lensmith import onnxmodel
from lensmith.drift.embeddings import GPU_MIN_BATCH, EmbeddingModel
from lensmith.layout import EXPORT_JSON, INT8_FILE, ONNX_FILE, OPTIMIZED_FILE
from lensmith.onnxmodel import CPU, CUDA, TENSORRT, OnnxModel, onnx_file_for, open_session, requested_providers, usable_providers
from lensmith.params import Params, params_from_dict

pytestmark = pytest.mark.timeout(900)

REAL_SESSION = ort.InferenceSession


class RecordingSession:
    """Stands in for ort.InferenceSession: records (path, providers with options, threads), runs the graph on the
    real CPU provider, and reports the first provider it was asked for as the one that runs."""

    calls: list[dict[str, Any]] = []
    preloads = 0

    def __init__(self, path: str, sess_options: Any = None, providers: Any = None) -> None:
        asked = [p if isinstance(p, tuple) else (p, {}) for p in providers or [CPU]]
        threads = sess_options.intra_op_num_threads if sess_options is not None else None
        RecordingSession.calls.append({"path": Path(path).name, "providers": asked, "threads": threads})
        self._real = REAL_SESSION(path, sess_options=sess_options, providers=[CPU])
        self._providers = [name for name, _ in asked]

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RecordingSession]]:
    """onnxruntime-gpu on a CUDA machine, as far as Lensmith can tell."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    RecordingSession.calls = []
    RecordingSession.preloads = 0

    def preload_dlls(*_: Any, **__: Any) -> None:
        RecordingSession.preloads += 1

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    onnxmodel.preload_gpu_libraries.cache_clear()
    yield RecordingSession
    onnxmodel.preload_gpu_libraries.cache_clear()


@pytest.fixture(scope="module")
def exported() -> Path:
    return Path(exported_project())


def options_of(call: dict[str, Any], provider: str) -> dict[str, Any] | None:
    return next((options for name, options in call["providers"] if name == provider), None)


# ---- the policy ------------------------------------------------------------------------------------------


def test_auto_asks_for_cuda_then_cpu_when_onnxruntime_offers_cuda_and_never_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    assert requested_providers("auto") == [CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])
    assert requested_providers("auto") == [CPU]
    assert requested_providers([TENSORRT, CPU]) == [TENSORRT, CPU]  # a list is taken as given
    assert usable_providers(requested_providers([TENSORRT, CUDA])) == [CPU]  # then unavailable ones are skipped
    with pytest.raises(ValueError, match="'auto' or a list"):
        requested_providers("CUDAExecutionProvider")  # a bare name is not a list of one


def test_measuring_sessions_disable_tf32_on_cuda_and_serving_keeps_the_defaults(
    exported: Path, fake_cuda: type[RecordingSession], caplog: pytest.LogCaptureFixture
) -> None:
    path = exported / "models" / "export" / ONNX_FILE
    with caplog.at_level(logging.INFO, logger="lensmith.onnx"):
        measuring = OnnxModel.load(path, "auto", exact=True)
    assert measuring.provider == CUDA
    assert any(f"runs on {CUDA} (requested auto)" in r.getMessage() for r in caplog.records)
    call = fake_cuda.calls[-1]
    assert [name for name, _ in call["providers"]] == [CUDA, CPU]
    assert options_of(call, CUDA) == {"use_tf32": "0"} and options_of(call, CPU) == {}

    OnnxModel.load(path, [CUDA, CPU])  # serving: ORT's own CUDA defaults
    assert options_of(fake_cuda.calls[-1], CUDA) == {}
    open_session(path, [CPU], exact=True)  # a CPU session has nothing to switch off
    assert fake_cuda.calls[-1]["providers"] == [(CPU, {})]


def test_gpu_sessions_preload_cuda_and_cudnn_once_and_cpu_sessions_never(exported: Path, fake_cuda: type[RecordingSession]) -> None:
    OnnxModel.load(exported / "models" / "export" / ONNX_FILE, [CPU])
    assert fake_cuda.preloads == 0  # a CPU service never touches the CUDA libraries
    OnnxModel.load(exported / "models" / "export" / ONNX_FILE, "auto")
    OnnxModel.load(exported / "models" / "export" / ONNX_FILE, [CUDA, CPU])
    assert fake_cuda.preloads == 1  # once per process, before the first GPU session


def test_an_onnxruntime_without_use_tf32_gets_no_unknown_option(
    exported: Path, fake_cuda: type[RecordingSession], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ort, "__version__", "1.17.3")  # use_tf32 arrived in 1.18; older CUDA providers reject unknown keys
    with caplog.at_level(logging.WARNING, logger="lensmith.onnx"):
        OnnxModel.load(exported / "models" / "export" / ONNX_FILE, "auto", exact=True)
    assert options_of(fake_cuda.calls[-1], CUDA) == {}
    assert any("NVIDIA_TF32_OVERRIDE=0" in r.getMessage() for r in caplog.records)


def test_on_a_gpu_provider_auto_serves_the_fp32_graph_even_when_the_export_chose_int8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (ONNX_FILE, OPTIMIZED_FILE, INT8_FILE):
        (tmp_path / name).write_bytes(b"onnx")
    (tmp_path / EXPORT_JSON).write_text(json.dumps({"serving_variant": "int8"}))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert onnx_file_for(tmp_path, "auto", [CUDA, CPU]) == (tmp_path / ONNX_FILE, "fp32")
    assert onnx_file_for(tmp_path, "auto", [CPU]) == (tmp_path / INT8_FILE, "int8")
    assert onnx_file_for(tmp_path, "int8", [CUDA, CPU]) == (tmp_path / INT8_FILE, "int8")  # asked for by name
    assert onnx_file_for(tmp_path, "fp32", [CUDA, CPU]) == (tmp_path / ONNX_FILE, "fp32")  # never the CPU-fused graph
    assert onnx_file_for(tmp_path, "fp32", [CPU]) == (tmp_path / OPTIMIZED_FILE, "fp32")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])  # CUDA asked for, but this build lacks it
    assert onnx_file_for(tmp_path, "auto", [CUDA, CPU]) == (tmp_path / INT8_FILE, "int8")
    assert onnx_file_for(tmp_path, "fp32", [CUDA, CPU]) == (tmp_path / OPTIMIZED_FILE, "fp32")


def test_fgsm_gradients_run_on_cuda_when_torch_sees_one_and_the_policy_allows_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.gradient_device("auto").type == "cuda"
    assert ev.gradient_device([CUDA, CPU]).type == "cuda"
    assert ev.gradient_device([CPU]).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.gradient_device("auto").type == "cpu"


def test_full_float32_switches_torch_tf32_off_and_restores_it() -> None:
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with ev.full_float32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


# ---- the stages on a (faked) GPU -----------------------------------------------------------------------


def test_evaluation_loads_the_fp32_graph_on_cuda_in_full_float32(tmp_path: Path, fake_cuda: type[RecordingSession]) -> None:
    layout = copy_project(tmp_path)
    export_json = layout.exported / EXPORT_JSON
    report = json.loads(export_json.read_text())
    export_json.write_text(json.dumps({**report, "serving_variant": "int8"}))  # as if int8 had won on this CPU
    (layout.exported / INT8_FILE).write_bytes((layout.exported / ONNX_FILE).read_bytes())
    served, block = ev.load_served(Params(), layout)
    assert block["provider"] == CUDA and block["file"] == ONNX_FILE and block["variant"] == "fp32"
    assert options_of(fake_cuda.calls[-1], CUDA) == {"use_tf32": "0"}
    cpu_only = params_from_dict({"evaluate": {"providers": [CPU]}})
    assert ev.load_served(cpu_only, layout)[1] == {**block, "provider": CPU, "file": INT8_FILE, "variant": "int8"}


def test_drift_embeddings_run_one_session_in_larger_batches_on_cuda(exported: Path, fake_cuda: type[RecordingSession], tmp_path: Path) -> None:
    model_path = exported / "models" / "export" / ONNX_FILE
    gpu = EmbeddingModel(model_path, tmp_path, providers="auto")
    assert gpu.provider == CUDA and gpu.on_gpu and gpu.parallel_runs == 1
    call = fake_cuda.calls[-1]
    assert options_of(call, CUDA) == {"use_tf32": "0"} and call["threads"] == (os.cpu_count() or 1)  # one run at a time
    sizes: list[int] = []
    real_run = gpu.run_uint8
    gpu.run_uint8 = lambda batch: (sizes.append(len(batch)), real_run(batch))[1]  # type: ignore[method-assign]
    images = np.random.default_rng(0).integers(0, 256, (GPU_MIN_BATCH + 10, 3, 32, 32), dtype=np.uint8)
    out = gpu.run_all(images, batch_size=64)
    assert sizes == [GPU_MIN_BATCH, 10] and out.embeddings.shape[0] == len(images)

    cpu = EmbeddingModel(model_path, tmp_path, providers=[CPU])
    assert cpu.provider == CPU and not cpu.on_gpu and fake_cuda.calls[-1]["threads"] == 1  # single-threaded runs side by side
    np.testing.assert_allclose(cpu.run_all(images, 64).embeddings, out.embeddings, rtol=1e-5, atol=1e-5)


def test_export_parity_runs_on_cuda_and_the_rest_stays_on_the_cpu(tmp_path: Path, fake_cuda: type[RecordingSession]) -> None:
    from lensmith.export import run_export

    layout = copy_project(tmp_path)
    summary = run_export(tiny_params(int8=False), layout)
    parity = summary.report["parity"]
    assert parity["provider"] == CUDA and parity["providers_requested"] == "auto"
    assert parity["optimized"]["provider"] == CPU  # model.opt.onnx is a CPU graph
    assert f"({CUDA})" in str(summary)
    parity_call = next(c for c in fake_cuda.calls if options_of(c, CUDA) is not None)
    assert parity_call["path"] == ONNX_FILE and options_of(parity_call, CUDA) == {"use_tf32": "0"}
    assert all(c["providers"] == [(CPU, {})] for c in fake_cuda.calls if c["path"] == OPTIMIZED_FILE)
    assert json.loads((layout.reports / EXPORT_JSON).read_text())["parity"]["provider"] == CUDA
