"""`lensmith export --tensorrt`: the TensorRT plan's checks that run without a GPU (missing package / GPU errors
before any work, the parity gate on a fake plan's logits, the profile from the serving params, the builder's calls
on a stand-in `tensorrt` module, the loader's refusals, the CLI flag), plus one real build that runs only where the
`tensorrt` package and a CUDA GPU exist."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from lensmith.export import ParityError, run_export
from lensmith.layout import Layout
from lensmith.onnxmodel import TensorRTSettings
from lensmith.params import Params, params_from_dict
from lensmith.preprocess import Preprocessing
from lensmith.tensorrtplan import (
    PLAN_FILE,
    PlanProfile,
    PlanTarget,
    TensorRTBackend,
    TensorRTError,
    export_plan,
    load_plan,
    plan_tolerance,
    tensorrt_backend,
)

pytestmark = pytest.mark.timeout(900)

PRE = Preprocessing(image_size=8, resize=8)
TARGET = PlanTarget("10.9.0", "NVIDIA Test GPU", "9.0")


def trt_params(*, fp16: bool = False, max_batch: int = 4, **export: Any) -> Params:
    return params_from_dict({"export": export, "serve": {"max_batch_size": max_batch, "tensorrt_fp16": fp16}})


def tiny_onnx(path: Path, name: str = "input", dims: tuple[Any, ...] = (3, 8, 8)) -> Path:
    """input N x C x H x W -> GlobalAveragePool -> Flatten -> logits N x C (a valid model, no weights)."""
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dims[0]])
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", [name], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"])], "tiny", [x], [y]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def channel_means(batch: np.ndarray) -> np.ndarray:
    """What the tiny model computes: the mean of each channel (the 'logits' of the fake plans)."""
    return batch.astype(np.float64).mean(axis=(2, 3)).astype(np.float32)


def images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)


class FakeBackend:
    """A plan backend without TensorRT: 'builds' some bytes and runs `compute` on each batch it is given."""

    def __init__(self, compute: Any = channel_means, target: PlanTarget = TARGET) -> None:
        self.compute, self.target = compute, target
        self.built: list[tuple[PlanProfile, bool]] = []
        self.batches: list[int] = []

    def build(self, onnx_path: Path, profile: PlanProfile, fp16: bool) -> bytes:
        self.built.append((profile, fp16))
        return b"fake plan for " + onnx_path.read_bytes()[:16]

    def open(self, plan_path: Path, profile: PlanProfile) -> Any:
        assert plan_path.is_file()

        def run(batch: np.ndarray) -> np.ndarray:
            assert batch.dtype == np.float32 and 1 <= len(batch) <= profile.max_batch
            self.batches.append(len(batch))
            return self.compute(batch)

        return run


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def old_export(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "project")
    layout.exported.mkdir(parents=True)
    (layout.exported / "model.onnx").write_bytes(b"the previous export")
    (layout.exported / "export.json").write_text('{"serving_variant": "fp32"}')
    return layout


def fake_tensorrt(version: str = "10.9.0", fp16_flag: bool = True) -> types.SimpleNamespace:
    return types.SimpleNamespace(__version__=version, BuilderFlag=types.SimpleNamespace(**({"FP16": "FP16"} if fp16_flag else {}), TF32="TF32"))


# ---- no GPU stack: clear errors before any work, the old export untouched -----------------------------------------


@pytest.fixture()
def no_expensive_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the export started reading the model before the TensorRT checks")

    monkeypatch.setattr("lensmith.export.load_candidate", fail)


@pytest.mark.parametrize("how", ["flag", "param"])
def test_a_missing_tensorrt_package_is_named_with_how_to_install_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_expensive_work: None, how: str
) -> None:
    layout = old_export(tmp_path)
    before = snapshot(layout.models)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, installed or not
    params = trt_params(tensorrt=how == "param")
    with pytest.raises(TensorRTError, match=r"needs the `tensorrt` Python package.*install the tensorrt package matching your CUDA, e\.g\. `pip install tensorrt`"):
        run_export(params, layout, tensorrt=how == "flag")
    assert snapshot(layout.models) == before and sorted(p.name for p in layout.models.iterdir()) == ["export"]


def test_no_cuda_device_says_a_plan_needs_a_cuda_gpu_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_expensive_work: None
) -> None:
    layout = old_export(tmp_path)
    before = snapshot(layout.models)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTError, match="a TensorRT plan needs a CUDA GPU"):
        run_export(trt_params(), layout, tensorrt=True)
    assert snapshot(layout.models) == before and sorted(p.name for p in layout.models.iterdir()) == ["export"]


def test_the_cli_reports_the_missing_package_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_expensive_work: None) -> None:
    from lensmith.cli import app

    layout = old_export(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(app, ["export", "--tensorrt", "--root", str(layout.root), "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1
    assert "pip install tensorrt" in result.output and "Traceback" not in result.output


def test_without_the_flag_or_the_param_no_tensorrt_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_backend(trt_params(), False) is None


def test_an_old_tensorrt_or_fp16_without_its_builder_flag_is_refused_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(TensorRTError, match=r"TensorRT 8\.6\.1 is too old"):
        tensorrt_backend(trt_params(), True, import_module=lambda name: fake_tensorrt("8.6.1"))
    with pytest.raises(TensorRTError, match=r"serve\.tensorrt_fp16 is true but TensorRT 11\.0\.0 has no BuilderFlag\.FP16"):
        tensorrt_backend(trt_params(fp16=True), True, import_module=lambda name: fake_tensorrt("11.0.0", fp16_flag=False))


# ---- the parity gate on the plan's logits (a fake plan runner) ------------------------------------------------------


def test_a_plan_matching_pytorch_passes_the_gate_and_is_recorded(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    data = images(10)
    reference = channel_means(PRE.normalize(data))
    backend = FakeBackend()
    block = export_plan(backend, trt_params(max_batch=4), model, tmp_path, data, reference, PRE, labels=reference.argmax(1))
    plan = tmp_path / PLAN_FILE
    assert plan.read_bytes().startswith(b"fake plan for ")
    assert backend.batches == [4, 4, 2], "chunks of at most the profile's max batch"
    assert block["file"] == PLAN_FILE and block["fp16"] is False and block["tf32"] is False
    assert (block["tensorrt_version"], block["gpu"], block["compute_capability"]) == ("10.9.0", "NVIDIA Test GPU", "9.0")
    assert block["profile"] == {"input": "input", "min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [4, 3, 8, 8]}
    assert block["size_bytes"] == plan.stat().st_size and block["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert block["source"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert block["parity"]["n_images"] == 10 and block["parity"]["top1_agreement"] == 1.0 and block["parity"]["max_abs_diff"] == 0.0
    assert block["accuracy"] == 1.0 and block["build_seconds"] >= 0
    json.dumps(block)  # export.json takes it as is


def test_a_flipped_top1_fails_the_gate_and_removes_the_plan(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    data = images(10)
    reference = channel_means(PRE.normalize(data))

    def flip_first(batch: np.ndarray) -> np.ndarray:  # the first image's top class moves; the logits barely change
        logits = channel_means(batch)
        if np.allclose(batch[0], PRE.normalize(data[:1])[0]):
            top = int(logits[0].argmax())
            logits[0, top] = logits[0].min() - 1e-3
        return logits

    params = trt_params(fp16=True, tensorrt_fp16_max_abs_diff=100.0)  # only top-1 agreement can fail
    with pytest.raises(ParityError, match=r"model\.plan \(TensorRT 10\.9\.0, fp16.*top-1 agreement 90\.0000% \(required 100\.00%\)"):
        export_plan(FakeBackend(flip_first), params, model, tmp_path, data, reference, PRE)
    assert not (tmp_path / PLAN_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "no temporary file is left behind"


def test_fp16_plans_get_their_own_logit_tolerance_and_fp32_plans_the_onnx_one(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    data = images(10)
    reference = channel_means(PRE.normalize(data))
    shifted = FakeBackend(lambda batch: channel_means(batch) + np.float32(0.003))  # fp16-sized rounding, no top-1 change
    block = export_plan(shifted, trt_params(fp16=True), model, tmp_path, data, reference, PRE)
    assert block["fp16"] is True and block["parity"]["max_abs_diff"] == pytest.approx(0.003, rel=1e-3)
    assert block["parity"]["max_allowed"] == pytest.approx(0.01 + 0.01 * np.abs(reference).max())
    with pytest.raises(ParityError, match=r"max \|logit diff\| 0\.003 \(allowed 0\.00"):
        export_plan(shifted, trt_params(fp16=False), model, tmp_path, data, reference, PRE)
    assert not (tmp_path / PLAN_FILE).exists()
    ep = trt_params().export
    assert plan_tolerance(ep, False) is ep
    loose = plan_tolerance(ep, True)
    assert (loose.parity_max_abs_diff, loose.parity_rtol, loose.parity_min_top1_agreement) == (0.01, 0.01, ep.parity_min_top1_agreement)


# ---- the profile and the builder's calls ------------------------------------------------------------------------


def test_the_profile_comes_from_serve_max_batch_size_and_the_models_own_input(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx", name="pixels", dims=(1, 24, 16))
    settings = TensorRTSettings.from_serve(trt_params(fp16=True, max_batch=12).serve)
    assert settings == TensorRTSettings(fp16=True, max_batch=12)
    profile = PlanProfile.from_model(model, settings)
    assert profile.input_name == "pixels"
    assert (profile.min_shape, profile.opt_shape, profile.max_shape) == ((1, 1, 24, 16), (12, 1, 24, 16), (12, 1, 24, 16))
    backend, gray = FakeBackend(), Preprocessing(image_size=16, resize=16, channels="L", mean=(0.5,), std=(0.5,))
    data = np.zeros((2, 1, 24, 16), np.uint8)
    export_plan(backend, trt_params(fp16=True, max_batch=12), model, tmp_path, data, channel_means(gray.normalize(data)), gray)
    assert backend.built == [(profile, True)]
    with pytest.raises(TensorRTError, match="needs a fixed C x H x W"):
        PlanProfile.from_model(tiny_onnx(tmp_path / "dynamic.onnx", dims=(3, "h", "w")), settings)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []


def stand_in_tensorrt(parse_ok: bool = True, build_ok: bool = True, inputs: tuple[str, ...] = ("input",)) -> tuple[Any, _Recorder]:
    """A `tensorrt` module stand-in that records the builder calls Lensmith makes (the real one needs a GPU)."""
    rec = _Recorder()
    severity = types.SimpleNamespace(INTERNAL_ERROR="internal", ERROR="error", WARNING="warning", INFO="info", VERBOSE="verbose")

    class ILogger:
        Severity = severity

        def __init__(self) -> None:
            pass

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name=inputs[i])

    class Parser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.num_errors = 0 if parse_ok else 2

        def parse_from_file(self, path: str) -> bool:
            rec.calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i: int) -> str:
            return ["In node 3 (Foo): UNSUPPORTED_NODE: no importer for Foo", "second error"][i]

    class Config:
        def set_flag(self, flag: str) -> None:
            rec.calls.append(("set_flag", flag))

        def clear_flag(self, flag: str) -> None:
            rec.calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile: Any) -> None:
            rec.calls.append(("add_profile",))

    class Profile:
        def set_shape(self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]) -> None:
            rec.calls.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            rec.calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> Any:
            if not build_ok:
                self.logger.log(severity.ERROR, "out of device memory")
                return None
            return bytearray(b"serialized")

    trt = types.SimpleNamespace(
        __version__="10.9.0", ILogger=ILogger, Builder=Builder, OnnxParser=Parser, BuilderFlag=types.SimpleNamespace(FP16="FP16", TF32="TF32")
    )
    return trt, rec


def real_backend_on(trt: Any) -> TensorRTBackend:
    backend = TensorRTBackend.__new__(TensorRTBackend)  # __init__ asks torch for the GPU
    backend.trt, backend.target = trt, TARGET
    return backend


@pytest.mark.parametrize("fp16", [False, True])
def test_the_builder_sets_the_profile_fp16_and_fp32_without_tf32(tmp_path: Path, fp16: bool) -> None:
    trt, rec = stand_in_tensorrt()
    profile = PlanProfile("input", (3, 8, 8), 16)
    plan = real_backend_on(trt).build(tiny_onnx(tmp_path / "model.onnx"), profile, fp16)
    assert plan == b"serialized"
    assert ("set_shape", "input", (1, 3, 8, 8), (16, 3, 8, 8), (16, 3, 8, 8)) in rec.calls and ("add_profile",) in rec.calls
    assert (("set_flag", "FP16") in rec.calls) == fp16
    assert ("clear_flag", "TF32") in rec.calls and rec.calls[0] == ("create_network", 0)


def test_parser_and_builder_failures_carry_tensorrts_messages(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    profile = PlanProfile("input", (3, 8, 8), 4)
    with pytest.raises(TensorRTError, match=r"ONNX parser rejected model\.onnx: In node 3 \(Foo\): UNSUPPORTED_NODE.*; second error"):
        real_backend_on(stand_in_tensorrt(parse_ok=False)[0]).build(model, profile, False)
    with pytest.raises(TensorRTError, match="could not build a plan from model.onnx: out of device memory"):
        real_backend_on(stand_in_tensorrt(build_ok=False)[0]).build(model, profile, False)
    with pytest.raises(TensorRTError, match=r"TensorRT sees inputs \['x'\], not the model's 'input'"):
        real_backend_on(stand_in_tensorrt(inputs=("x",))[0]).build(model, profile, False)


# ---- loading a plan: only on the GPU model and TensorRT version it was built with ---------------------------------------


def test_the_loader_refuses_a_plan_for_another_gpu_or_tensorrt_version(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    data = images(4)
    block = export_plan(FakeBackend(), trt_params(), model, tmp_path, data, channel_means(PRE.normalize(data)), PRE)
    (tmp_path / "export.json").write_text(json.dumps({"tensorrt": block}))
    run = load_plan(tmp_path / PLAN_FILE, FakeBackend())
    assert run(PRE.normalize(data[:2])).shape == (2, 3)
    for other in (PlanTarget("10.9.0", "NVIDIA A10", "8.6"), PlanTarget("10.12.0", "NVIDIA Test GPU", "9.0")):
        with pytest.raises(TensorRTError, match=r"was built for NVIDIA Test GPU \(compute capability 9\.0\) with TensorRT 10\.9\.0; "
                           r"this machine has .* rebuild it here with `lensmith export --tensorrt`"):
            load_plan(tmp_path / PLAN_FILE, FakeBackend(target=other))
    (tmp_path / PLAN_FILE).write_bytes(b"another plan")
    with pytest.raises(TensorRTError, match="sha256 differs"):
        load_plan(tmp_path / PLAN_FILE, FakeBackend())
    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(TensorRTError, match="no record of the GPU and TensorRT version"):
        load_plan(tmp_path / PLAN_FILE, FakeBackend())


# ---- wiring: the CLI flag and the param reach run_export ----------------------------------------------------------------


def test_the_cli_flag_reaches_run_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.cli import app

    seen: list[bool] = []
    monkeypatch.setattr("lensmith.export.run_export", lambda params, layout, tensorrt=False: seen.append(tensorrt) or "exported")
    args = ["export", "--root", str(tmp_path), "--params", str(tmp_path / "none.yaml")]
    assert CliRunner().invoke(app, [*args, "--tensorrt"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == [True, False]
    assert "--tensorrt" in CliRunner().invoke(app, ["export", "--help"]).output


def test_the_flag_overrides_the_param_and_the_param_alone_asks_for_a_plan() -> None:
    from lensmith.tensorrtplan import wants_tensorrt

    assert wants_tensorrt(trt_params(tensorrt=False), True) and wants_tensorrt(trt_params(tensorrt=True), False)
    assert not wants_tensorrt(trt_params(tensorrt=False), False)


# ---- run_export end to end with a stand-in plan (ONNX Runtime runs the 'plan') -------------------------------------------


class OnnxAsPlan(FakeBackend):
    """The 'plan' is a copy of model.onnx run by ONNX Runtime: the whole run_export path without TensorRT."""

    def __init__(self, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip

    def build(self, onnx_path: Path, profile: PlanProfile, fp16: bool) -> bytes:
        self.built.append((profile, fp16))
        return onnx_path.read_bytes()

    def open(self, plan_path: Path, profile: PlanProfile) -> Any:
        from lensmith.onnxmodel import OnnxModel

        model = OnnxModel.load(plan_path)
        self.compute = (lambda batch: model.logits(batch)[:, ::-1].copy()) if self.flip else model.logits
        return super().open(plan_path, profile)


def project_params(**export: Any) -> Params:
    from servekit import tiny_params

    raw = tiny_params(int8=False, **export).model_dump(mode="json")
    raw["serve"]["max_batch_size"] = 4
    return params_from_dict(raw)


def test_run_export_writes_the_gated_plan_and_its_report_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from servekit import copy_project

    layout = copy_project(tmp_path)
    backend = OnnxAsPlan()
    monkeypatch.setattr("lensmith.tensorrtplan.tensorrt_backend", lambda params, requested=False: backend if requested or params.export.tensorrt else None)
    summary = run_export(project_params(tensorrt=True), layout)
    block = json.loads((layout.exported / "export.json").read_text())["tensorrt"]
    assert json.loads((layout.reports / "export.json").read_text())["tensorrt"] == block
    assert (layout.exported / PLAN_FILE).read_bytes() == (layout.exported / "model.onnx").read_bytes()  # built from the final file
    assert block["parity"]["n_images"] == summary.report["parity"]["n_images"] and block["parity"]["top1_agreement"] == 1.0
    assert block["profile"]["max"] == [4, 3, 32, 32] and max(backend.batches) == 4
    assert "TensorRT plan model.plan (fp32, batch 1..4" in str(summary)


def test_run_export_with_a_failing_plan_leaves_the_previous_export_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from servekit import copy_project

    layout = copy_project(tmp_path)
    before, report_before = snapshot(layout.exported), (layout.reports / "export.json").read_bytes()
    monkeypatch.setattr("lensmith.tensorrtplan.tensorrt_backend", lambda params, requested=False: OnnxAsPlan(flip=True))
    with pytest.raises(ParityError, match=r"parity gate failed for model\.plan .*the export was not written"):
        run_export(project_params(), layout, tensorrt=True)
    assert snapshot(layout.exported) == before and (layout.reports / "export.json").read_bytes() == report_before
    assert sorted(p.name for p in layout.models.iterdir()) == sorted(["candidate", "export"]), "no temporary folder is left"


# ---- the real thing, where there is a GPU stack -----------------------------------------------------------------------------

HAS_GPU_STACK = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(not HAS_GPU_STACK, reason="needs the `tensorrt` package installed and a CUDA GPU visible to torch (torch.cuda.is_available())")
def test_a_real_plan_from_a_tiny_exported_model_matches_pytorch(tmp_path: Path) -> None:
    """Build real fp32 and fp16 plans from the tiny exported model (batch profile 1..4, so the 10 test images run in
    three chunks), gate them against eager PyTorch, load the fp32 plan through the loader and run it again."""
    from servekit import copy_project

    from lensmith.export import load_split_images, torch_logits
    from lensmith.modelio import load_trained

    layout = copy_project(tmp_path)
    summary = run_export(project_params(), layout, tensorrt=True)  # fp32 plan, TF32 off: the ONNX tolerance
    block = summary.report["tensorrt"]
    plan = layout.exported / PLAN_FILE
    assert plan.is_file() and block["size_bytes"] == plan.stat().st_size and block["fp16"] is False
    assert block["gpu"] == torch.cuda.get_device_name() and block["tensorrt_version"] == __import__("tensorrt").__version__
    assert block["parity"]["top1_agreement"] == 1.0 and block["parity"]["max_abs_diff"] <= block["parity"]["max_allowed"]

    backend = tensorrt_backend(project_params(), True)
    assert backend is not None
    trained = load_trained(layout.candidate)
    test = load_split_images(layout, "test", trained.classes, trained.preprocessing)
    reference = torch_logits(trained.model, trained.preprocessing, test.images)
    run = load_plan(plan, backend)
    again = np.concatenate([run(trained.preprocessing.normalize(test.images[s : s + 4])) for s in range(0, len(test.labels), 4)])
    assert np.abs(again - reference).max() <= block["parity"]["max_allowed"]

    # fp16: its own logit tolerance; top-1 agreement relaxed only because random weights give near-ties
    raw = project_params(parity_min_top1_agreement=0.0).model_dump(mode="json")
    raw["serve"]["tensorrt_fp16"] = True
    fp16_params = params_from_dict(raw)
    fp16_dir = tmp_path / "fp16"
    fp16_dir.mkdir()
    fp16 = export_plan(backend, fp16_params, layout.exported / "model.onnx", fp16_dir, test.images, reference, trained.preprocessing, test.labels)
    assert fp16["fp16"] is True and fp16["parity"]["max_abs_diff"] <= fp16["parity"]["max_allowed"]
