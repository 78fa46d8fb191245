"""The evaluate stage: the model that is served (the exported ONNX variant the service loads, through ONNX
Runtime with the serving preprocessing) on the test split, decided at its operating point.

Writes reports/metrics.json (DVC metrics), reports/plots/{confusion,pr_curve,roc}.csv (DVC plots),
PNG figures beside them, and a self-contained reports/evaluation.html (the plots and the HTML are
rendered by `lensmith.evaluation.report`).

`evaluate_model` is the pure core (model + preprocessing + decoded images + labels + metadata ->
`Evaluation`; the model is an ONNX model or a torch module); `run_evaluate` is the file wiring around it. FGSM needs
gradients, so that attack alone runs on the PyTorch weights of the same candidate.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lensmith import metrics as m
from lensmith.errors import DataError, ImageRejected
from lensmith.evaluation.report import format_optional, render_html, write_plots
from lensmith.fsutil import write_json_atomic
from lensmith.imageio import load_image
from lensmith.inference import measure_speed, predict_probabilities, preprocess_uint8
from lensmith.layout import Layout
from lensmith.metrics import EvaluationError
from lensmith.modelio import load_candidate
from lensmith.onnxmodel import AUTO, GPU_PROVIDERS, OnnxModel, ProviderPolicy, onnx_file_for, requested_providers, usable_providers
from lensmith.operating import DecisionRule, argmax_rule, figures_at
from lensmith.params import EvaluateParams, Params
from lensmith.preprocess import Preprocessing
from lensmith.resolve import Resolved, resolve
from lensmith.robustness import fgsm_predictions, perturb_all, robustness_summary
from lensmith.shards import ImageRef, frame_image_refs
from lensmith.split import read_split_frame

__all__ = ["EvaluationError", "Evaluation", "EvaluationSummary", "evaluate_model", "run_evaluate"]

log = logging.getLogger("lensmith.evaluate")

SPEED_BUDGET_S = 3.0  # seconds spent on each of throughput and latency


def metrics_path(layout: Layout) -> Path:
    return layout.metrics_json


def html_path(layout: Layout) -> Path:
    return layout.reports / "evaluation.html"


def plots_dir(layout: Layout) -> Path:
    return layout.reports / "plots"


# ---- inputs ---------------------------------------------------------------------------------------------


def read_test_split(layout: Layout) -> pd.DataFrame:
    """The test split, checked for the columns evaluation needs and for emptiness."""
    try:
        frame = read_split_frame(layout, "test", ("label",), needed_for="nothing to evaluate (check split.test)")
    except DataError as exc:
        raise EvaluationError(str(exc)) from None
    if "file" not in frame.columns and "path" not in frame.columns:
        raise EvaluationError(f"{layout.split_file('test')} lacks the column(s) ['file']; rerun `lensmith split`")
    return frame


def decode_images(refs: Sequence[ImageRef | Path]) -> list[np.ndarray]:
    """Decoded uint8 arrays (HxWxC), one per image; a missing or undecodable file is an EvaluationError."""
    images = []
    for path in refs:
        try:
            img = load_image(path)
        except FileNotFoundError:
            raise EvaluationError(
                f"test image {path} does not exist; rerun `lensmith ingest` and `lensmith split`"
            ) from None
        except ImageRejected as exc:
            raise EvaluationError(f"test image {path} cannot be decoded ({exc}); rerun `lensmith ingest`") from None
        arr = np.asarray(img, dtype=np.uint8)
        images.append(arr[:, :, None] if arr.ndim == 2 else arr)
    return images


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Test labels -> class indices of the model; labels the model does not know are an EvaluationError."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(label) for label in labels} - set(index))
    if unknown:
        raise EvaluationError(
            f"the test split has label(s) the model was not trained on: {', '.join(unknown)}; "
            f"model classes: {', '.join(classes)} (retrain on the current splits)"
        )
    return np.asarray([index[str(label)] for label in labels], dtype=np.int64)


# ---- the pure core ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Everything evaluation computed: the metrics.json content and the data behind the plots."""

    metrics: dict[str, Any]
    classes: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    confusion: np.ndarray
    pr_curve: pd.DataFrame
    roc_curve: pd.DataFrame
    reliability: pd.DataFrame
    warnings: dict[str, str] = field(default_factory=dict)  # key -> message, also in metrics.json

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def test_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: int, positive_indices: Sequence[int]
) -> dict[str, Any]:
    """The `test` block of metrics.json."""
    y_pred = probs.argmax(axis=1)
    n = len(classes)
    return {
        "n": int(len(y_true)),
        "accuracy": m.accuracy(y_true, y_pred),
        "macro_f1": m.macro_f1(y_true, y_pred, n),
        "weighted_f1": m.weighted_f1(y_true, y_pred, n),
        "top_k": int(min(top_k, n)),
        "top_k_accuracy": m.top_k_accuracy(y_true, probs, top_k),
        "per_class": m.per_class_metrics(y_true, y_pred, classes),
        # None: no defect-vs-ok view (no good class among the labels); the gate's defect floors do not apply
        "positive_class": {
            "name": m.positive_class_name(classes, positive_indices),
            **m.positive_class_metrics(y_true, y_pred, probs, positive_indices),
        }
        if positive_indices
        else None,
    }


def slices_block(
    metadata: pd.DataFrame,
    columns: Sequence[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    positive_indices: Sequence[int],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Per-slice metrics for each column present; a warning (keyed `slices.<column>`) for each that is not."""
    block: dict[str, Any] = {}
    warnings: dict[str, str] = {}
    for column in columns:
        if column not in metadata.columns:
            warnings[f"slices.{column}"] = (
                f"slice column {column!r} is not in the test split; no per-slice metrics for it"
            )
            continue
        block[column] = m.slice_metrics(metadata[column], y_true, y_pred, num_classes, positive_indices)
    return block, warnings


def robustness_accuracies(
    model: nn.Module,
    preprocessing: Preprocessing,
    images: Sequence[np.ndarray],
    y_true: np.ndarray,
    perturbations: Sequence[str],
    severities: Sequence[int],
    batch_size: int,
    seed: int,
) -> dict[str, dict[int, float]]:
    """Accuracy under each perturbation x severity, applied to the decoded images before preprocessing."""
    result: dict[str, dict[int, float]] = {}
    for name in perturbations:
        result[name] = {}
        for severity in sorted(set(severities)):
            probs = predict_probabilities(model, preprocessing, perturb_all(images, name, severity, seed), batch_size)
            result[name][severity] = m.accuracy(y_true, probs.argmax(axis=1))
    return result


def fgsm_block(
    model: nn.Module,
    preprocessing: Preprocessing,
    images: Sequence[np.ndarray],
    y_true: np.ndarray,
    epsilon: float,
    clean_accuracy: float,
    batch_size: int,
) -> dict[str, Any]:
    """Accuracy under a one-step FGSM attack; epsilon in 0..1 pixel units (see robustness.fgsm_predictions). Runs on
    the model's own device, in full float32 there (no TF32)."""
    device = next(model.parameters()).device
    predictions = []
    with full_float32():
        for start in range(0, len(images), batch_size):
            batch = preprocess_uint8(images[start : start + batch_size], preprocessing)
            predictions.append(fgsm_predictions(model, preprocessing, batch, y_true[start : start + batch_size], epsilon, device))
    acc = m.accuracy(y_true, np.concatenate(predictions))
    drop = (clean_accuracy - acc) / clean_accuracy if clean_accuracy > 0 else 0.0
    return {
        "epsilon": float(epsilon), "epsilon_units": "pixel_0_1", "accuracy": acc, "relative_drop": float(drop), "device": device.type,
    }


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 in torch's CUDA convolutions and matmuls while measuring (torch allows it for cuDNN convolutions by
    default); the previous settings come back after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def gradient_device(policy: ProviderPolicy) -> torch.device:
    """Where the FGSM gradients run: CUDA when torch sees one and evaluate.providers allows a GPU (auto, or a list
    naming a GPU provider), else the CPU."""
    wants_gpu = policy == AUTO or any(p in GPU_PROVIDERS for p in policy)
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def decision_block(
    rule: DecisionRule, y_true: np.ndarray, probs: np.ndarray, metadata: pd.DataFrame, slice_columns: Sequence[str]
) -> dict[str, Any]:
    """The test split at the model's operating point: the figures a plant reads (overall and per slice value)."""
    block: dict[str, Any] = {"rule": rule.as_dict()}
    if rule.kind != "threshold" or rule.point is None:
        decisions = [rule.decide(p) for p in probs]
        block["review_rate"] = float(np.mean([d == "review" for d in decisions])) if decisions else 0.0
        return block
    positives = [rule.classes.index(c) for c in rule.positive_classes]
    is_defect, scores = m.is_positive(y_true, positives), m.positive_scores(probs, positives)
    block["test"] = figures_at(rule.point, is_defect, scores)
    block["slices"] = {
        column: {str(value): figures_at(rule.point, is_defect[rows], scores[rows])
                 for value, rows in metadata.groupby(column, sort=True).indices.items()}
        for column in slice_columns if column in metadata.columns
    }
    return block


def evaluate_model(
    model: Any,
    preprocessing: Preprocessing,
    classes: Sequence[str],
    images: Sequence[np.ndarray],
    y_true: np.ndarray,
    metadata: pd.DataFrame,
    params: EvaluateParams,
    *,
    speed_budget_s: float = SPEED_BUDGET_S,
    resolved: Resolved | None = None,
    rule: DecisionRule | None = None,
    gradient_model: nn.Module | None = None,
) -> Evaluation:
    """All metrics of one model on decoded test images (uint8 HxWxC) with true class indices.

    `resolved`: the data-dependent settings (negative class, slices); None = resolved here from `metadata`.
    `rule`: the operating point to report at (None = argmax). `gradient_model`: torch weights for the FGSM attack
    (the model itself when it is a torch module)."""
    classes = list(classes)
    if resolved is None:
        resolved = resolve(Params(evaluate=params), metadata, classes)
    positive = m.positive_class_indices(classes, resolved.positive_class, resolved.negative_class)
    if isinstance(model, nn.Module):
        model.eval()
        gradient_model = gradient_model or model
    probs = predict_probabilities(model, preprocessing, images, params.batch_size)
    y_pred = probs.argmax(axis=1)
    test = test_metrics(y_true, probs, classes, params.top_k, positive)
    slices, warnings = slices_block(metadata, resolved.slices, y_true, y_pred, len(classes), positive)
    rob = params.robustness
    robustness = robustness_summary(
        test["accuracy"],
        robustness_accuracies(
            model, preprocessing, images, y_true, rob.perturbations, rob.severities, params.batch_size, rob.seed
        ),
    )
    robustness["fgsm"] = (
        fgsm_block(gradient_model, preprocessing, images, y_true, rob.fgsm_epsilon, test["accuracy"], params.batch_size)
        if rob.fgsm_epsilon is not None and gradient_model is not None
        else None
    )
    speed = measure_speed(model, preprocessing, params.batch_size, budget_s=speed_budget_s)
    metrics = {
        "test": test,
        "calibration": {"ece": m.expected_calibration_error(probs, y_true, params.ece_bins), "bins": params.ece_bins},
        "slices": slices,
        "resolved": resolved.as_dict(),
        "robustness": robustness,
        "throughput": speed.to_dict(),
        "decision": decision_block(rule or argmax_rule(tuple(classes), None), y_true, probs, metadata, resolved.slices),
    }
    if warnings:
        metrics["warnings"] = dict(warnings)
    return Evaluation(
        metrics=metrics,
        classes=classes,
        y_true=y_true,
        probs=probs,
        confusion=m.confusion(y_true, y_pred, len(classes)),
        pr_curve=m.pr_curve_frame(y_true, probs, positive),
        roc_curve=m.roc_curve_frame(y_true, probs, positive),
        reliability=m.reliability_table(probs, y_true, params.ece_bins),
        warnings=warnings,
    )


def worst_misclassified(y_true: np.ndarray, probs: np.ndarray, limit: int) -> list[int]:
    """Indices of wrong predictions, most confident first."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = probs[wrong, y_pred[wrong]]
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:limit]]


def model_block(arch: str, classes: Sequence[str], meta: dict[str, Any]) -> dict[str, Any]:
    """`model` block of metrics.json: what was evaluated (data hash etc. copied from meta.json when present)."""
    block: dict[str, Any] = {"arch": arch, "classes": {str(i): c for i, c in enumerate(classes)}}
    data_hash = meta.get("data_hash")
    # train writes {"combined": ..., "<file>": ...}; the combined hash is the one to compare runs by
    block["data_hash"] = data_hash.get("combined") if isinstance(data_hash, dict) else data_hash
    for key in ("weights_sha256", "git_commit", "best_epoch"):
        if key in meta and not isinstance(meta[key], (dict, list)):
            block[key] = meta[key]
    return block


# ---- the stage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationSummary:
    metrics_path: Path
    html_path: Path
    n_test: int
    accuracy: float
    macro_f1: float
    positive_class: str
    roc_auc: float | None
    ece: float
    mean_relative_drop: float | None
    images_per_s: float
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [
            f"evaluated {self.n_test} test images: accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f}, "
            f"ROC-AUC[{self.positive_class}] {format_optional(self.roc_auc)}, ECE {self.ece:.4f}, "
            f"mean robustness drop {format_optional(self.mean_relative_drop)}, {self.images_per_s:.1f} img/s",
            f"wrote {self.metrics_path} and {self.html_path}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def whole_data_frame(layout: Layout, test: pd.DataFrame) -> pd.DataFrame:
    """Every split's rows (what the manifest held): data-dependent settings resolve as they did in validate."""
    parts = [test]
    for name in ("train", "val"):
        path = layout.split_file(name)
        if path.is_file():
            parts.append(pd.read_parquet(path))
    return pd.concat(parts, ignore_index=True)


def load_served(params: Params, layout: Layout) -> tuple[OnnxModel, dict[str, Any]]:
    """The exported file the service would load (serve.variant; auto = the export's choice: fp32 on a GPU provider),
    on evaluate.providers (auto = CUDA when onnxruntime offers it, else the CPU), in full float32."""
    if not layout.exported.is_dir():
        raise EvaluationError(f"no exported model at {layout.exported}: run `lensmith export` first (evaluation measures the served model)")
    providers = usable_providers(requested_providers(params.evaluate.providers))
    path, variant = onnx_file_for(layout.exported, params.serve.variant, providers)
    served = OnnxModel.load(path, providers, exact=True)
    return served, {"file": path.name, "variant": variant, "provider": served.provider, "model_version": served.version}


def fgsm_model(model: nn.Module, policy: ProviderPolicy) -> nn.Module:
    """The candidate's torch weights on the device the FGSM attack runs on (see `gradient_device`)."""
    device = gradient_device(policy)
    log.info("evaluate: FGSM gradients run on %s", device)
    return model.to(device)


def run_evaluate(params: Params, layout: Layout) -> EvaluationSummary:
    """Evaluate the exported, served model on data/splits/test.parquet and write the reports."""
    frame = read_test_split(layout)
    trained = load_candidate(layout)
    served, served_block = load_served(params, layout)
    if list(served.classes) != list(trained.classes):
        raise EvaluationError(f"{served.path} has classes {served.classes}, the candidate {trained.classes}: re-run `lensmith export`")
    y_true = label_indices(frame["label"].astype(str).tolist(), trained.classes)
    resolved = resolve(params, whole_data_frame(layout, frame), trained.classes)
    m.positive_class_indices(trained.classes, resolved.positive_class, resolved.negative_class)
    paths = frame_image_refs(frame, layout.root)
    images = decode_images(paths)
    evaluation = evaluate_model(
        served,
        served.preprocessing,
        trained.classes,
        images,
        y_true,
        frame,
        params.evaluate,
        speed_budget_s=SPEED_BUDGET_S,
        resolved=resolved,
        rule=served.decision_rule(),
        gradient_model=fgsm_model(trained.model, params.evaluate.providers) if params.evaluate.robustness.fgsm_epsilon is not None else None,
    )
    evaluation.metrics["model"] = model_block(trained.arch, trained.classes, trained.meta)
    evaluation.metrics["served"] = served_block
    pngs = write_plots(evaluation, plots_dir(layout))
    write_json_atomic(metrics_path(layout), evaluation.metrics)
    worst = worst_misclassified(evaluation.y_true, evaluation.probs, params.evaluate.worst_examples)
    report = render_html(evaluation, pngs, images, [p.name for p in paths], worst)
    report.save(html_path(layout))
    test = evaluation.metrics["test"]
    return EvaluationSummary(
        metrics_path=metrics_path(layout),
        html_path=html_path(layout),
        n_test=test["n"],
        accuracy=test["accuracy"],
        macro_f1=test["macro_f1"],
        positive_class=test["positive_class"]["name"] if test["positive_class"] else "none",
        roc_auc=test["positive_class"]["roc_auc"] if test["positive_class"] else None,
        ece=evaluation.metrics["calibration"]["ece"],
        mean_relative_drop=evaluation.metrics["robustness"]["mean_relative_drop"],
        images_per_s=evaluation.metrics["throughput"]["images_per_s"],
        warnings=tuple(evaluation.warnings.values()),
    )
