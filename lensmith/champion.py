"""The production model scored again on today's test split, the way the candidate was: its own served ONNX file,
through ONNX Runtime, at its own operating point. The gate compares like with like; the metrics stored with the
production version (scored on an older split) are only the fallback when this cannot be done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensmith.errors import LensmithError
from lensmith.evaluate import decision_block, decode_images, label_indices, read_test_split, slices_block, test_metrics, whole_data_frame
from lensmith.inference import predict_probabilities
from lensmith.layout import Layout
from lensmith.metrics import positive_class_indices
from lensmith.onnxmodel import OnnxModel, onnx_file_for, requested_providers, usable_providers
from lensmith.params import Params
from lensmith.resolve import resolve
from lensmith.shards import frame_image_refs


@dataclass(frozen=True)
class Rescored:
    """Production's metrics on the current test split (metrics.json shape: test, slices, decision), or why not."""

    metrics: dict[str, Any] | None
    why_not: str | None = None
    seconds: float = 0.0


def rescore_production(params: Params, layout: Layout, folder: Path) -> Rescored:
    """Score the production version in `folder` on layout's test split; never raises for a model that cannot be
    loaded or does not know today's labels (the gate falls back to stored metrics and says why)."""
    import time

    start = time.perf_counter()
    try:
        providers = usable_providers(requested_providers(params.evaluate.providers))  # as the candidate was evaluated
        path, variant = onnx_file_for(folder, params.serve.variant, providers)
        model = OnnxModel.load(path, providers, exact=True)
        frame = read_test_split(layout)
        y_true = label_indices(frame["label"].astype(str).tolist(), model.classes)
    except (LensmithError, OSError, ValueError) as exc:
        return Rescored(None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    classes = list(model.classes)
    resolved = resolve(params, whole_data_frame(layout, frame), classes)
    positive = positive_class_indices(classes, resolved.positive_class, resolved.negative_class)
    probs = predict_probabilities(model, model.preprocessing, decode_images(frame_image_refs(frame, layout.root)),
                                  params.evaluate.batch_size)
    slices, _ = slices_block(frame, resolved.slices, y_true, probs.argmax(axis=1), len(classes), positive)
    metrics = {
        "test": test_metrics(y_true, probs, classes, params.evaluate.top_k, positive),
        "slices": slices,
        "decision": decision_block(model.decision_rule(), y_true, probs, frame, resolved.slices),
        "served": {"file": path.name, "variant": variant, "provider": model.provider, "model_version": model.version},
    }
    return Rescored(metrics, None, time.perf_counter() - start)
