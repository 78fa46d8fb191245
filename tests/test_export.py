"""Export: a real dynamo export of a small model on real demo images, its checks, gates and report."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from servekit import copy_project, exported_project, tiny_params

from lensmith.export import (
    ParityError,
    Parity,
    check_parity,
    choose_variant,
    int8_block,
    load_split_images,
    onnx_logits,
    parity,
    quantize_int8,
    runtime_op_counts,
    torch_logits,
)
from lensmith.modelio import load_trained
from lensmith.layout import Layout
from lensmith.onnxmodel import OnnxModel

pytestmark = pytest.mark.timeout(900)

REQUIRED_METADATA = {
    "lensmith.classes",
    "lensmith.preprocessing",
    "lensmith.input_size",
    "lensmith.mean",
    "lensmith.std",
    "lensmith.resize",
    "lensmith.version",
    "lensmith.git_commit",
    "lensmith.data_hash",
    "lensmith.train_params_hash",
    "lensmith.model_version",
}


@pytest.fixture(scope="module")
def project() -> Layout:
    return Layout(exported_project())


def test_export_writes_a_checked_onnx_with_metadata(project: Layout) -> None:
    model = onnx.load(str(project.exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert REQUIRED_METADATA <= set(props)
    trained = load_trained(project.candidate)
    assert json.loads(props["lensmith.classes"]) == trained.classes
    assert json.loads(props["lensmith.preprocessing"]) == trained.preprocessing.to_dict()
    assert props["lensmith.input_size"] == "3x32x32"


def test_exported_model_has_a_dynamic_batch_axis_and_matches_pytorch(project: Layout) -> None:
    trained = load_trained(project.candidate)
    test = load_split_images(project, "test", trained.classes, trained.preprocessing)
    onnx_model = OnnxModel.load(project.exported / "model.onnx")
    for n in (1, 3, len(test.labels)):
        ref = torch_logits(trained.model, trained.preprocessing, test.images[:n])
        got = onnx_model.logits_uint8(test.images[:n])
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4


def test_export_report_records_parity_int8_decision_and_speed(project: Layout) -> None:
    report = json.loads((project.reports / "export.json").read_text())
    assert report == json.loads((project.exported / "export.json").read_text())
    n_test = len(load_split_images(project, "test", load_trained(project.candidate).classes, load_trained(project.candidate).preprocessing).labels)
    assert report["parity"]["n_images"] == n_test
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["top1_agreement"] == 1.0
    assert report["parity"]["optimized"]["max_abs_diff"] <= 1e-4
    # export.parity_providers auto on this machine (no GPU): parity ran on the CPU, as did the optimized graph's
    assert report["parity"]["provider"] == report["parity"]["optimized"]["provider"] == "CPUExecutionProvider"
    assert report["provider"] == "CPUExecutionProvider"
    assert set(report["images_per_s"]["fp32"]) == {"b1", "b32"}
    kept = report["int8"]["kept"]
    assert (project.exported / "model.int8.onnx").is_file() == kept
    assert report["int8"]["runtime_ops"].get("QLinearConv", 0) > 0, "the report shows what ORT runs for the int8 graph"
    assert report["serving_variant"] in ({"fp32", "int8"} if kept else {"fp32"})
    assert (project.exported / "model.opt.onnx").is_file()


def test_the_served_variant_travels_with_its_decision_rule_chosen_on_validation(project: Layout) -> None:
    """The threshold is chosen on the whole validation split with the served variant, meets the recall target there,
    and is in every ONNX file's metadata, so a site serving the file alone decides the same way."""
    from lensmith.operating import DecisionRule

    report = json.loads((project.reports / "export.json").read_text())
    decision = report["decision"]
    classes = load_trained(project.candidate).classes
    assert decision["chosen_with"] == report["serving_variant"]
    assert decision["n_val"] == len(load_split_images(project, "val", classes, load_trained(project.candidate).preprocessing).labels)
    rule = DecisionRule.from_dict(decision["rule"])
    if rule.kind == "threshold":
        assert rule.negative_class == "ok" and "ok" not in rule.positive_classes
        assert rule.point is not None and decision["validation"]["recall"] >= 0.95
    else:
        assert "no threshold can be chosen" in decision["validation"]["note"]
    for name in ("model.onnx", "model.opt.onnx", "model.int8.onnx"):
        if (project.exported / name).is_file():
            props = {p.key: p.value for p in onnx.load(str(project.exported / name)).metadata_props}
            assert json.loads(props["lensmith.decision"]) == decision["rule"]


def test_decision_rule_from_params_and_validation_probabilities() -> None:
    from lensmith.decisionrule import choose_decision_rule

    classes = ["chip", "ok", "scratch"]
    probabilities = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.05, 0.9, 0.05]])
    y_true = np.array([0, 0, 2, 1, 1])
    rule, figures = choose_decision_rule(tiny_params(), classes, probabilities, y_true)
    assert rule.kind == "threshold" and rule.positive_classes == ("chip", "scratch")
    assert figures["recall"] == 1.0 and rule.point is not None and rule.point.threshold == pytest.approx(0.4)
    assert [rule.decide(p) for p in probabilities] == ["defect", "defect", "defect", "ok", "ok"]
    argmax, note = choose_decision_rule(tiny_params(), classes, probabilities[3:], y_true[3:])
    assert argmax.kind == "argmax" and "no defect images" in note["note"]
    digits, _ = choose_decision_rule(tiny_params(), ["0", "1"], probabilities[:, :2], np.array([0, 0, 1, 1, 1]))
    assert digits.kind == "argmax" and digits.decide(np.array([0.2, 0.8])) == "1"


def test_int8_file_is_quantised_qdq_per_channel(project: Layout) -> None:
    if not (project.exported / "model.int8.onnx").is_file():
        pytest.skip("the int8 gate rejected the model in this run")
    graph = onnx.load(str(project.exported / "model.int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weight_scales = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert weight_scales, "per-channel quantisation stores one scale per output channel"


def test_int8_graph_is_laid_out_for_the_fast_x86_kernels(project: Layout, tmp_path: Path) -> None:
    """Every Conv quantised with uint8 activations and symmetric 7-bit per-channel int8 weights, and fused into
    QLinearConv by ONNX Runtime at ORT_ENABLE_ALL: the layout bench/int8_configs.py measured as the fast one."""
    trained = load_trained(project.candidate)
    calibration = load_split_images(project, "train", trained.classes, trained.preprocessing).images[:8]
    path = quantize_int8(project.exported / "model.onnx", tmp_path / "model.int8.onnx", calibration, trained.preprocessing, "minmax")
    graph = onnx.load(str(path)).graph
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        weight, activation = producer.get(conv.input[1]), producer.get(conv.input[0])
        assert weight is not None and weight.op_type == "DequantizeLinear", f"{conv.name} weights are not quantised"
        values, zero_points = initializers[weight.input[0]], initializers[weight.input[2]]
        assert values.dtype == np.int8 and zero_points.size == values.shape[0] and not zero_points.any()
        assert np.abs(values.astype(np.int32)).max() <= 64, "reduce_range: 255 * 64 * 2 fits VPMADDUBSW's int16 sums"
        assert activation is not None and activation.op_type == "DequantizeLinear"
        assert initializers[activation.input[2]].dtype == np.uint8
    runtime = runtime_op_counts(path, "all")
    assert runtime.get("QLinearConv") == len(convs) and "Conv" not in runtime and "FusedConv" not in runtime
    assert "QLinearConv" not in runtime_op_counts(project.exported / "model.onnx", "all")


def test_parity_gate_fails_with_the_numbers_on_a_different_model(project: Layout, tmp_path: Path) -> None:
    trained = load_trained(project.candidate)
    test = load_split_images(project, "test", trained.classes, trained.preprocessing)
    other = OnnxModel.load(Path(exported_project(seed=1)) / "models" / "export" / "model.onnx")
    result = parity(torch_logits(trained.model, trained.preprocessing, test.images), onnx_logits(other, test.images))
    assert result.max_abs_diff > 1e-4
    with pytest.raises(ParityError, match=r"max \|logit diff\| .* top-1 agreement"):
        check_parity(result, tiny_params().export, "model.onnx")
    check_parity(Parity(n_images=3, max_abs_diff=5e-5, mean_abs_diff=1e-5, top1_agreement=1.0), tiny_params().export, "x")


def test_int8_gate_rejects_an_accuracy_drop_and_is_served_only_when_faster() -> None:
    ep = tiny_params(int8_max_drop=0.01).export
    fast = {"fp32": {"b1": 100.0, "b32": 400.0}, "int8": {"b1": 250.0, "b32": 1200.0}}
    slow = {"fp32": {"b1": 100.0, "b32": 400.0}, "int8": {"b1": 60.0, "b32": 380.0}}
    rejected = int8_block(ep, 0.90, 0.88, fast, None)
    assert not rejected["kept"] and "drop +0.0200" in rejected["reason"]
    kept_fast = int8_block(ep, 0.90, 0.895, fast, None)
    assert kept_fast["kept"] and choose_variant(kept_fast) == "int8"
    kept_slow = int8_block(ep, 0.90, 0.90, slow, None)
    assert kept_slow["kept"] and choose_variant(kept_slow) == "fp32"
    assert choose_variant(rejected) == "fp32"


def test_unavailable_providers_fall_back_to_cpu_with_a_log_line(project: Layout, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lensmith.onnx"):
        model = OnnxModel.load(project.exported / "model.onnx", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert model.provider == "CPUExecutionProvider"
    assert any("runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    assert any("not available" in r.getMessage() for r in caplog.records)


def test_export_without_a_candidate_is_a_one_line_error(tmp_path: Path) -> None:
    from lensmith.cli import app

    result = CliRunner().invoke(app, ["export", "--root", str(tmp_path), "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1
    assert "no trained model" in result.output and "Traceback" not in result.output


def test_serving_code_imports_without_torch() -> None:
    code = "import sys; import lensmith.serve.app, lensmith.onnxmodel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_cli_export_reruns_on_the_real_project(tmp_path: Path) -> None:
    """The CLI end to end on a copy: re-exporting replaces the files and rewrites the report."""
    from lensmith.cli import app

    layout = copy_project(tmp_path)
    (layout.exported / "model.onnx").unlink()
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(tiny_params(int8=False).model_dump(mode="json")))
    result = CliRunner().invoke(app, ["export", "--root", str(layout.root), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "parity on" in result.output and "int8 skipped" in result.output
    assert (layout.exported / "model.onnx").is_file() and not (layout.exported / "model.int8.onnx").exists()


def test_tensorrt_engine_cache_is_outside_versioned_folders_and_per_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TensorRT provider's engine cache: under $LENSMITH_TENSORRT_CACHE, named by the ONNX file's content, never
    beside the model (a registry version is DVC-tracked; an engine there would make `dvc status` report it changed)."""
    from lensmith.onnxmodel import CPU, TENSORRT, TENSORRT_CACHE_ENV, provider_options, tensorrt_cache_dir

    version = tmp_path / "models" / "registry" / "versions" / "v0001"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"first model")
    (tmp_path / "other.onnx").write_bytes(b"second model")
    monkeypatch.setenv(TENSORRT_CACHE_ENV, str(tmp_path / "cache"))
    first = tensorrt_cache_dir(version / "model.onnx")
    assert first.parent == tmp_path / "cache" and version not in first.parents
    assert tensorrt_cache_dir(version / "model.onnx") == first  # stable for the same file
    assert tensorrt_cache_dir(tmp_path / "other.onnx") != first  # another model, another folder
    options = provider_options(TENSORRT, first)
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(first)
    assert provider_options(CPU, first) == {}
    monkeypatch.delenv(TENSORRT_CACHE_ENV)
    assert tensorrt_cache_dir(version / "model.onnx").parent == Path.home() / ".cache" / "lensmith" / "tensorrt"


def test_tensorrt_builds_fp16_and_one_batch_profile_from_the_served_batch_size(project: Layout, tmp_path: Path) -> None:
    """serve.tensorrt_fp16 and serve.max_batch_size become the TensorRT provider's options, the profile named after
    the exported model's real input (read from the file without its weights)."""
    from lensmith.onnxmodel import TENSORRT, TensorRTSettings, model_input, provider_options, tensorrt_profile

    name, dims = model_input(project.exported / "model.onnx")
    assert len(dims) == 3 and dims[0] == 3 and all(d > 0 for d in dims)
    options = provider_options(TENSORRT, tmp_path, TensorRTSettings(fp16=True, max_batch=16), (name, dims))
    shape = "x".join(map(str, dims))
    assert options["trt_fp16_enable"] is True
    assert options["trt_profile_min_shapes"] == f"{name}:1x{shape}"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == f"{name}:16x{shape}"
    assert provider_options(TENSORRT, tmp_path, TensorRTSettings(fp16=False), None)["trt_fp16_enable"] is False
    assert tensorrt_profile(name, (3, 0, 0), 16) == {}  # a dynamic spatial size: no fixed profile
