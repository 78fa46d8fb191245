"""The drift reference, stored beside the model at training time (after export).

models/candidate/drift_reference.parquet  one row per reference image: split (train|val), path, label,
                                          image statistics, PCA components of the penultimate-layer
                                          embedding, predicted label and confidence, the image's context
                                          (the split files' metadata columns: site, lighting, ...) and its
                                          split group (batch)
models/candidate/drift_reference.json     the PCA (mean, components), per-column summaries, the model it
                                          was made with, the validation predictions' class distribution,
                                          mean confidence and accuracy, the slice columns (lensmith.drift.slices)
                                          and the false-alarm calibration (lensmith.drift.calibration): the
                                          drifted columns and the relative drop of mean confidence of resampled
                                          held-out (val) windows per slice and size

Statistics come from the split files (ingest measured them) when present, else from the images.
Embeddings and predictions come from the exported model.onnx through ONNX Runtime, exactly as
monitoring computes them for current images.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensmith.datacache import cached_images
from lensmith.drift.calibration import HELD_OUT_SPLIT, REFERENCE_SPLIT, calibrate_slice
from lensmith.drift.current import NOT_CONTEXT, STAT_COLUMNS, cell_text
from lensmith.drift.embeddings import EmbeddingModel, Projection, component_columns, fit_projection
from lensmith.drift.slices import WHOLE, resolved_slice_columns, slice_keys
from lensmith.errors import DataError
from lensmith.fsutil import file_sha256, write_json_atomic, write_parquet_atomic
from lensmith.imageio import load_image
from lensmith.imagestats import image_stats
from lensmith.layout import ONNX_FILE, Layout
from lensmith.params import DriftParams, Params
from lensmith.resolve import group_column_of, metadata_columns
from lensmith.shards import ImageRef, frame_image_refs
from lensmith.split import read_split_frame
from lensmith.splitdata import image_hashes

REFERENCE_PARQUET = "drift_reference.parquet"
REFERENCE_JSON = "drift_reference.json"
REFERENCE_FORMAT = 3  # 2: context columns, slices and the false-alarm calibration; 3: + the null windows' confidence drops
GROUP_COLUMN = "group"  # the split's group (batch) of each row: held-out windows are resampled by it
MIN_HELD_OUT_ROWS = 20  # a slice with fewer validation rows is not calibrated (drift.share_threshold applies)


@dataclass
class Reference:
    frame: pd.DataFrame
    meta: dict[str, Any]
    projection: Projection

    @property
    def embedding_columns(self) -> list[str]:
        return list(self.meta["embedding_columns"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def mean_confidence(self) -> float:
        return float(self.meta["predictions"]["mean_confidence"])

    @property
    def context_columns(self) -> list[str]:
        return list(self.meta.get("context_columns", []))

    @property
    def slice_columns(self) -> list[str]:
        return list(self.meta.get("slices", {}).get("columns", []))

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.meta.get("calibration")

    def comparison_rows(self) -> pd.DataFrame:
        """The rows data drift is measured against: training rows when held-out rows calibrated it, else all."""
        if self.calibration and (self.frame["split"] == REFERENCE_SPLIT).any():
            return self.frame[self.frame["split"] == REFERENCE_SPLIT]
        return self.frame


def reference_paths(model_dir: Path) -> tuple[Path, Path]:
    return Path(model_dir) / REFERENCE_PARQUET, Path(model_dir) / REFERENCE_JSON


def onnx_model_path(layout: Layout, model_dir: Path) -> Path:
    """model.onnx of `model_dir`; for the candidate, the export stage's folder when it writes there."""
    own = Path(model_dir) / ONNX_FILE
    if own.is_file() or Path(model_dir) != layout.candidate:
        return own
    exported = Path(getattr(layout, "exported", layout.models / "export")) / ONNX_FILE
    return exported if exported.is_file() else own


# ---- building --------------------------------------------------------------------------------------------


def read_split_rows(layout: Layout, name: str, limit: int, seed: int) -> pd.DataFrame:
    """The split's rows (at most `limit`, a seeded sample)."""
    frame = read_split_frame(layout, name)
    if len(frame) > limit:
        frame = frame.sample(n=limit, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def stats_frame(frame: pd.DataFrame, refs: list[ImageRef]) -> pd.DataFrame:
    """Image statistics per row: the manifest's columns when the split carries them, else measured now."""
    if set(STAT_COLUMNS) <= set(frame.columns) and frame[list(STAT_COLUMNS)].notna().all().all():
        return frame[list(STAT_COLUMNS)].astype(float).reset_index(drop=True)
    rows = []
    for ref in refs:
        img = load_image(ref)
        rows.append({**image_stats(img), "width": img.width, "height": img.height})
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS)).astype(float)


def split_reference_rows(
    layout: Layout, name: str, model: EmbeddingModel, limit: int, batch_size: int, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows without embedding columns, raw embeddings) for one split."""
    frame = read_split_rows(layout, name, limit, seed)
    refs = frame_image_refs(frame, layout.root)
    images = cached_images(refs, image_hashes(frame, refs), model.preprocessing, layout.cache_dir, desc=f"caching {name}")
    outputs = model.run_all(images, batch_size)
    rows = pd.DataFrame({"split": name, "path": frame.get("path", frame["file"]).astype(str), "label": frame["label"].astype(str)})
    rows = pd.concat([rows, stats_frame(frame, refs), context_frame(frame)], axis=1)
    rows["predicted_label"] = [model.classes[i] for i in outputs.probabilities.argmax(axis=1)]
    rows["confidence"] = outputs.probabilities.max(axis=1)
    return rows, outputs.embeddings


def context_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The split rows' metadata columns as text (site, lighting, ...) and their split group."""
    columns = [c for c in metadata_columns(list(frame.columns)) if c not in NOT_CONTEXT and c not in STAT_COLUMNS]
    context = pd.DataFrame({c: frame[c].map(cell_text).astype(object) for c in columns}, index=frame.index)
    if GROUP_COLUMN in frame.columns:
        context[GROUP_COLUMN] = frame[GROUP_COLUMN].map(cell_text).astype(object)
    return context.reset_index(drop=True)


def calibration_sizes(dp: DriftParams) -> list[int]:
    """The calibrated window sizes: drift.calibration_sizes up to drift.max_window_images (larger windows are sampled)."""
    sizes = sorted({min(int(s), dp.max_window_images) for s in dp.calibration_sizes})
    return sizes or [dp.max_window_images]


def resampling_group(frame: pd.DataFrame, context_columns: list[str]) -> str | None:
    """The column whose groups (batches) null windows are drawn by: the split's group, else a batch-like metadata column."""
    if GROUP_COLUMN in frame.columns and frame[GROUP_COLUMN].notna().any():
        return GROUP_COLUMN
    return group_column_of(context_columns)


def reference_calibration(
    frame: pd.DataFrame, columns: list[str], slice_columns: list[str], dp: DriftParams, group: str | None = GROUP_COLUMN
) -> dict[str, Any] | None:
    """Null windows from the held-out rows per slice (WHOLE and each slice value with enough rows), drawn by `group`;
    None without held-out rows."""
    train, held_out = frame[frame["split"] == REFERENCE_SPLIT], frame[frame["split"] == HELD_OUT_SPLIT]
    if held_out.empty or dp.calibration_windows == 0:
        return None
    group = group if group in frame.columns else None
    sizes = calibration_sizes(dp)

    def one(ref: pd.DataFrame, out: pd.DataFrame) -> dict[str, Any]:
        if len(ref) < dp.min_slice_rows or len(out) < MIN_HELD_OUT_ROWS:
            return {"reference_rows": int(len(ref)), "held_out_rows": int(len(out)), "sizes": {}}
        return calibrate_slice(ref, out, group, columns, sizes, dp.calibration_windows, dp.p_value, dp.min_effect, dp.seed)

    slices = {WHOLE: one(train, held_out)}
    if slice_columns:
        train_keys, held_keys = slice_keys(train, slice_columns), slice_keys(held_out, slice_columns)
        for key in sorted(set(train_keys.dropna())):
            slices[key] = one(train[train_keys == key], held_out[held_keys == key])
    return {
        "held_out_split": HELD_OUT_SPLIT,
        "group_column": group,
        "p_value": dp.p_value,
        "min_effect": dp.min_effect,
        "windows": dp.calibration_windows,
        "sizes": sizes,
        "columns": columns,
        "slices": slices,
    }


def column_summary(frame: pd.DataFrame, columns: list[str]) -> dict[str, dict[str, float]]:
    return {c: {"mean": float(frame[c].mean()), "std": float(frame[c].std(ddof=0)), "min": float(frame[c].min()), "max": float(frame[c].max())} for c in columns}


def predictions_summary(rows: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    counts = rows["predicted_label"].value_counts()
    return {
        "split": str(rows["split"].iloc[0]),
        "n": int(len(rows)),
        "mean_confidence": float(rows["confidence"].mean()),
        "accuracy": float((rows["predicted_label"] == rows["label"]).mean()),
        "class_distribution": {c: float(counts.get(c, 0)) / len(rows) for c in classes},
    }


def build_reference(params: Params, layout: Layout, model_dir: Path) -> Path:
    """Write drift_reference.parquet + .json into `model_dir` (embeddings from its exported model.onnx); returns the parquet."""
    dp = params.drift
    model_dir = Path(model_dir)
    model = EmbeddingModel(onnx_model_path(layout, model_dir), layout.cache_dir, providers=dp.providers)
    train, train_emb = split_reference_rows(layout, "train", model, dp.max_reference_rows, dp.batch_size, dp.seed)
    projection = fit_projection(train_emb, dp.embedding_dims, dp.seed)
    columns = component_columns(len(projection.components))
    parts, embedded = [train], [train_emb]
    if layout.split_file("val").is_file():
        val, val_emb = split_reference_rows(layout, "val", model, dp.max_reference_rows, dp.batch_size, dp.seed)
        parts.append(val)
        embedded.append(val_emb)
    frame = pd.concat(parts, ignore_index=True)
    frame[columns] = projection.transform(np.concatenate(embedded))
    own = {"split", "path", "label", "predicted_label", "confidence", GROUP_COLUMN, *STAT_COLUMNS, *columns}
    context_columns = [str(c) for c in frame.columns if c not in own]
    slice_columns, slice_reason = resolved_slice_columns(dp, frame, context_columns)
    prediction_rows = parts[-1]  # validation predictions when there is a val split: train ones are overconfident
    meta = {
        "format": REFERENCE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": model.version,
        "model_sha256": file_sha256(model.model_path),
        "classes": model.classes,
        "preprocessing": model.preprocessing.to_dict(),
        "embedding_size": int(train_emb.shape[1]),
        "embedding_provider": model.provider,
        "embedding_columns": columns,
        "stat_columns": list(STAT_COLUMNS),
        "n": {split: int((frame["split"] == split).sum()) for split in ("train", "val")},
        "projection": projection.to_dict(),
        "summary": column_summary(frame[frame["split"] == "train"], [*STAT_COLUMNS, *columns]),
        "predictions": predictions_summary(prediction_rows, model.classes),
        "params": dp.model_dump(mode="json", exclude={"finetune"}),
        "context_columns": context_columns,
        "slices": {"columns": slice_columns, "reason": slice_reason},
        "calibration": reference_calibration(frame, [*STAT_COLUMNS, *columns], slice_columns, dp, resampling_group(frame, context_columns)),
    }
    parquet_path, json_path = reference_paths(model_dir)
    write_parquet_atomic(parquet_path, frame)
    write_json_atomic(json_path, meta)
    return parquet_path


# ---- loading ---------------------------------------------------------------------------------------------


def load_reference(model_dir: Path) -> Reference:
    """The stored reference of the model in `model_dir`, or a DataError saying how to make it."""
    parquet_path, json_path = reference_paths(model_dir)
    if not parquet_path.is_file() or not json_path.is_file():
        raise DataError(
            f"no drift reference in {model_dir} ({REFERENCE_PARQUET} + {REFERENCE_JSON}); it is built after export "
            "by `lensmith drift-reference` (DVC stage drift_reference)"
        )
    import json

    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        frame = pd.read_parquet(parquet_path)
        projection = Projection.from_dict(meta["projection"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"the drift reference in {model_dir} is unreadable ({type(exc).__name__}: {exc}); rebuild it") from None
    return Reference(frame=frame, meta=meta, projection=projection)
