"""The evaluate stage: pure core on a tiny trained CNN, file outputs, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from lensmith import evaluate as ev
from lensmith.errors import LensmithError
from lensmith.inference import predict_probabilities
from lensmith.layout import Layout
from lensmith.metrics import EvaluationError
from lensmith.params import EvaluateParams, Params, RobustnessParams
from lensmith.preprocess import Preprocessing

CLASSES = ["ok", "scratch", "stain"]
SIZE = 32
PRE = Preprocessing(image_size=SIZE, resize=SIZE)


def synthetic_image(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """ok: plain grey tile; scratch: a bright horizontal line; stain: a dark disc."""
    img = np.full((size, size, 3), rng.integers(100, 141), dtype=np.float32) + rng.normal(0, 5, (size, size, 3))
    if label == 1:
        row = rng.integers(4, size - 6)
        img[row : row + 2] = 240
    elif label == 2:
        cy, cx = rng.integers(8, size - 8, 2)
        yy, xx = np.ogrid[:size, :size]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 30
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_set(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    return [synthetic_image(int(label), rng) for label in labels], labels


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> object:
    """The test machine is shared: two OpenMP threads on a busy 2-core box run convs 10-50x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(one_torch_thread: object) -> nn.Module:
    """A few full-batch Adam steps on the synthetic tiles: enough for near-perfect clean accuracy."""
    torch.manual_seed(0)
    images, labels = synthetic_set(90, seed=0)
    x = PRE.normalize_tensor(torch.as_tensor(np.stack(images).transpose(0, 3, 1, 2)))
    y = torch.as_tensor(labels)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def fast_params(**overrides: object) -> EvaluateParams:
    robustness = RobustnessParams(perturbations=["brightness_down", "blur", "noise"], severities=[1, 5], fgsm_epsilon=0.1)
    return EvaluateParams(slices=["site", "camera"], batch_size=16, worst_examples=4, robustness=robustness, **overrides)


def test_predict_probabilities_accepts_pil_arrays_and_preprocessed_batches(tiny_model: nn.Module) -> None:
    images, _ = synthetic_set(6, seed=3)
    from_arrays = predict_probabilities(tiny_model, PRE, images, batch_size=4)
    from_pil = predict_probabilities(tiny_model, PRE, [Image.fromarray(i) for i in images], batch_size=4)
    from_batch = predict_probabilities(tiny_model, PRE, np.stack(images).transpose(0, 3, 1, 2), batch_size=5)
    np.testing.assert_allclose(from_arrays, from_pil)
    np.testing.assert_allclose(from_arrays, from_batch, atol=1e-6)
    np.testing.assert_allclose(from_arrays.sum(axis=1), 1.0)


def test_evaluate_model_metrics_shape_and_values(tiny_model: nn.Module) -> None:
    images, labels = synthetic_set(45, seed=1)
    metadata = pd.DataFrame({"site": np.where(np.arange(45) < 20, "A", "B")})
    result = ev.evaluate_model(tiny_model, PRE, CLASSES, images, labels, metadata, fast_params(), speed_budget_s=0.05)
    metrics = result.metrics
    test = metrics["test"]
    assert test["accuracy"] >= 0.9 and test["macro_f1"] >= 0.9
    assert set(test["per_class"]) == set(CLASSES)
    assert set(test["per_class"]["ok"]) == {"precision", "recall", "f1", "support"}
    assert test["positive_class"]["name"] == "any of scratch|stain"
    assert {"roc_auc", "average_precision", "recall", "precision"} <= set(test["positive_class"])
    assert test["top_k_accuracy"] == 1.0  # top_k=3 of 3 classes
    assert 0.0 <= metrics["calibration"]["ece"] <= 1.0
    site = metrics["slices"]["site"]
    assert set(site["values"]) == {"A", "B"} and site["values"]["A"]["n"] == 20
    assert {"n", "accuracy", "macro_f1", "tpr", "fpr"} == set(site["values"]["A"])
    assert "camera" not in metrics["slices"] and "camera" in metrics["warnings"]["slices.camera"]
    rob = metrics["robustness"]
    assert rob["clean_accuracy"] == test["accuracy"]
    assert set(rob["perturbations"]) == {"brightness_down", "blur", "noise"}
    assert set(rob["perturbations"]["noise"]) == {"1", "5"}
    assert rob["perturbations"]["noise"]["5"]["accuracy"] <= 1.0 and isinstance(rob["mean_relative_drop"], float)
    assert rob["fgsm"]["epsilon"] == 0.1 and 0.0 <= rob["fgsm"]["accuracy"] <= 1.0
    speed = metrics["throughput"]
    assert speed["images_per_s"] > 0 and speed["batch_size"] == 16
    assert 0 < speed["latency_ms_p50"] <= speed["latency_ms_p95"]
    assert result.confusion.sum() == 45 and list(result.pr_curve.columns) == ["precision", "recall", "threshold"]
    json.dumps(metrics, allow_nan=False)  # plain numbers only; DVC cannot read NaN


def test_robustness_is_deterministic(tiny_model: nn.Module) -> None:
    images, labels = synthetic_set(12, seed=2)
    run = lambda: ev.robustness_accuracies(tiny_model, PRE, images, labels, ["noise", "rotation"], [3], 8, seed=4)  # noqa: E731
    assert run() == run()


def test_worst_misclassified_orders_by_confidence() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y_true = np.array([1, 1, 1, 0])
    assert ev.worst_misclassified(y_true, probs, 10) == [0, 3, 2]
    assert ev.worst_misclassified(y_true, probs, 1) == [0]


def test_label_indices_rejects_labels_the_model_does_not_know() -> None:
    np.testing.assert_array_equal(ev.label_indices(["stain", "ok"], CLASSES), [2, 0])
    with pytest.raises(EvaluationError, match="not trained on: dent.*ok, scratch, stain"):
        ev.label_indices(["ok", "dent"], CLASSES)


# ---- the stage on files -------------------------------------------------------------------------------------


def write_test_split(root: Path, n: int = 18, labels: list[str] | None = None) -> pd.DataFrame:
    images, label_ids = synthetic_set(n, seed=5)
    rows = []
    for i, (image, label_id) in enumerate(zip(images, label_ids)):
        label = labels[i] if labels else CLASSES[label_id]
        rel = Path("data/raw/demo") / label / f"{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
        rows.append({"file": str(rel), "path": str(rel), "label": label, "sha256": f"{i:064x}",
                     "site": "AB"[i % 2], "lighting": "day", "batch": f"b{i // 6}"})
    frame = pd.DataFrame(rows)
    (root / "data/splits").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(root / "data/splits/test.parquet", index=False)
    return frame


def save_candidate(root: Path, classes: list[str] = CLASSES) -> None:
    """A real lensmith model directory (random-init mobilenet_v3_small at 32 px: fast, accuracy irrelevant here)."""
    from lensmith.modelio import save_trained
    from lensmith.models import build_model, preprocessing_for

    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", len(classes), pretrained=False, dropout=0.0, image_size=SIZE)
    save_trained(Layout(root).candidate, model, arch="mobilenet_v3_small", classes=classes,
                 preprocessing=preprocessing_for("mobilenet_v3_small", SIZE), meta={"data_hash": "abc123"})
    save_plain_export(root)


def save_plain_export(root: Path) -> None:
    """The candidate as ONNX with its metadata (no int8, no decision rule: an export from before rules existed)."""
    from lensmith.export import export_onnx, model_metadata, set_metadata
    from lensmith.modelio import load_candidate
    from lensmith.params import ExportParams

    trained = load_candidate(Layout(root))
    Layout(root).exported.mkdir(parents=True, exist_ok=True)
    path = export_onnx(trained.model, trained.preprocessing, Layout(root).exported / "model.onnx", ExportParams().opset)
    set_metadata(path, model_metadata(trained))


def stage_params(**evaluate: object) -> Params:
    robustness = {"perturbations": ["glare", "jpeg"], "severities": [2]}
    return Params.model_validate(
        {"evaluate": {"batch_size": 8, "worst_examples": 3, "robustness": robustness, **evaluate}}
    )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setattr(ev, "SPEED_BUDGET_S", 0.05)
    write_test_split(tmp_path)
    save_candidate(tmp_path)
    return Layout(tmp_path)


def test_run_evaluate_writes_metrics_plots_and_self_contained_html(project: Layout) -> None:
    summary = ev.run_evaluate(stage_params(slices=["site", "lighting", "camera"]), project)
    metrics = json.loads((project.reports / "metrics.json").read_text())
    assert {"test", "slices", "robustness", "calibration", "throughput", "model", "served", "decision"} <= set(metrics)
    assert metrics["served"]["file"] == "model.onnx" and metrics["served"]["provider"] == "CPUExecutionProvider"
    assert metrics["decision"]["rule"]["kind"] == "argmax"  # exported before decision rules: argmax, as served
    for key in ("accuracy", "macro_f1", "weighted_f1", "top_k_accuracy"):
        assert isinstance(metrics["test"][key], float)
    assert metrics["model"]["arch"] == "mobilenet_v3_small" and metrics["model"]["data_hash"] == "abc123"
    assert set(metrics["slices"]) == {"site", "lighting"}
    assert isinstance(metrics["slices"]["site"]["equalized_odds_gap"], float)
    assert metrics["warnings"] == {"slices.camera": "slice column 'camera' is not in the test split; no per-slice metrics for it"}
    assert set(metrics["robustness"]["perturbations"]) == {"glare", "jpeg"} and metrics["robustness"]["fgsm"] is None

    plots = project.reports / "plots"
    confusion = pd.read_csv(plots / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 18
    assert set(confusion["actual"]) == set(CLASSES)
    assert list(pd.read_csv(plots / "pr_curve.csv").columns) == ["precision", "recall", "threshold"]
    assert list(pd.read_csv(plots / "roc.csv").columns) == ["fpr", "tpr", "threshold"]
    assert all((plots / f"{name}.png").stat().st_size > 0 for name in ("confusion", "curves", "reliability"))

    html = (project.reports / "evaluation.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), "report must not load anything remote"
    for section in ("Per class", "Confusion matrix", "Per slice", "Robustness", "Most confident mistakes"):
        assert section in html
    assert "camera" in html  # the missing slice column is reported
    assert "accuracy" in str(summary) and str(project.reports / "metrics.json") in str(summary)


def test_missing_test_split_names_file_and_stage(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"test\.parquet.*lensmith split"):
        ev.run_evaluate(stage_params(), Layout(tmp_path))


def test_missing_model_names_file_and_stage(tmp_path: Path) -> None:
    write_test_split(tmp_path)
    with pytest.raises(LensmithError, match=r"models/candidate/model\.pt.*train"):
        ev.run_evaluate(stage_params(), Layout(tmp_path))


def test_empty_test_split_is_an_error(tmp_path: Path) -> None:
    frame = write_test_split(tmp_path)
    frame.iloc[0:0].to_parquet(tmp_path / "data/splits/test.parquet", index=False)
    with pytest.raises(EvaluationError, match="empty"):
        ev.run_evaluate(stage_params(), Layout(tmp_path))


def test_unknown_test_labels_are_an_error(tmp_path: Path) -> None:
    write_test_split(tmp_path, n=4, labels=["ok", "dent", "scratch", "stain"])
    save_candidate(tmp_path)
    with pytest.raises(EvaluationError, match="dent"):
        ev.run_evaluate(stage_params(), Layout(tmp_path))


def test_positive_class_not_among_classes_names_the_classes(project: Layout) -> None:
    with pytest.raises(EvaluationError, match="positive_class='dent'.*ok, scratch, stain"):
        ev.run_evaluate(stage_params(positive_class="dent"), project)


def test_missing_image_file_is_named(project: Layout) -> None:
    victim = project.root / pd.read_parquet(project.split_file("test"))["file"].iloc[0]
    victim.unlink()
    with pytest.raises(EvaluationError, match=re.escape(str(victim))):
        ev.run_evaluate(stage_params(), project)


# ---- end to end with the real demo data and the real trainer -------------------------------------------------


def standin_splits(layout: Layout) -> None:
    """70/15/15 per class by position in the manifest (the split stage's own logic is not under test here)."""
    manifest = pd.read_parquet(layout.manifest)
    position = manifest.groupby("label").cumcount() % 20
    parts = {"train": position < 14, "val": (position >= 14) & (position < 17), "test": position >= 17}
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name, mask in parts.items():
        manifest[mask].to_parquet(layout.split_file(name), index=False)


@pytest.mark.slow
def test_auto_slices_are_the_metadata_columns_the_data_has(project: Layout) -> None:
    summary = ev.run_evaluate(stage_params(), project)
    metrics = json.loads(summary.metrics_path.read_text())
    assert set(metrics["slices"]) == {"site", "lighting"} and "warnings" not in metrics
    assert metrics["resolved"]["evaluate.slices"] == ["site", "lighting"]  # batch: the group column
    assert metrics["resolved"]["evaluate.negative_class"] == "ok"


def test_evaluate_a_model_trained_by_lensmith_train_on_demo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensmith.demodata import generate_demo_dataset
    from lensmith.export import run_export
    from lensmith.ingest import run_ingest
    from lensmith.params import ExportParams
    from lensmith.train import run_train

    monkeypatch.setattr(ev, "SPEED_BUDGET_S", 0.2)
    layout = Layout(tmp_path)
    demo = tmp_path / "data/raw/demo"
    generate_demo_dataset(demo, sites=None, seed=0, per_class=20, image_size=64, workers=1)
    params = Params.model_validate(
        {
            "data": {"source": str(demo)},
            "train": {"image_size": 64, "epochs": 2, "freeze_epochs": 0, "batch_size": 32, "device": "cpu", "num_threads": 1},
            "evaluate": {"batch_size": 16, "worst_examples": 4, "robustness": {"severities": [3], "fgsm_epsilon": 0.01}},
        }
    )
    run_ingest(params, layout)
    standin_splits(layout)
    run_train(params, layout)
    run_export(params.model_copy(update={"export": ExportParams(int8=False, bench_seconds=0.2)}), layout)
    summary = ev.run_evaluate(params, layout)

    metrics = json.loads((layout.reports / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == summary.n_test == len(pd.read_parquet(layout.split_file("test")))
    assert test["positive_class"]["name"] == "any of crack|pitting|scratch|stain"  # negative_class: ok
    assert set(metrics["slices"]) == {"site", "lighting", "camera"}
    assert set(metrics["robustness"]["perturbations"]) == {"brightness_up", "brightness_down", "glare", "blur", "noise", "rotation", "jpeg"}
    assert metrics["robustness"]["fgsm"]["epsilon"] == 0.01
    assert metrics["robustness"]["fgsm"]["device"] == "cpu" and metrics["served"]["provider"] == "CPUExecutionProvider"  # no GPU here
    assert metrics["model"]["arch"] == "efficientnet_lite0" and len(metrics["model"]["data_hash"]) == 64
    assert test["accuracy"] > 1 / len(metrics["model"]["classes"])  # pretrained backbone, 2 epochs: above chance
    assert (layout.reports / "evaluation.html").stat().st_size > 10_000
    # the served ONNX model decides at the threshold export chose on validation; the test figures are at that point
    assert metrics["served"]["variant"] == "fp32" and metrics["served"]["file"] == "model.opt.onnx"
    decision = metrics["decision"]
    if decision["rule"]["kind"] == "threshold":
        at_point = decision["test"]
        assert {"recall", "false_alarm_rate", "precision", "review_rate", "expected_cost"} <= set(at_point)
        assert set(decision["slices"]) == {"site", "lighting", "camera"}
        assert "Decision at the operating point" in (layout.reports / "evaluation.html").read_text()
