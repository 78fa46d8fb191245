"""`lensmith drift --current SOURCE`: the current window against the model's stored reference.

One Evidently 0.7 report:
- DataDriftPreset over the image statistics and the PCA components of the embeddings, with KS
  (numeric) / chi-square (categorical) p-values: above 1000 rows Evidently's defaults are distances,
  whose thresholds mean something else.
- ValueDrift of the predicted class (chi-square) and of the confidence (KS), against the
  validation predictions (training-split rows carry no prediction in the report's reference, since
  a model is overconfident on what it was trained on).
- ClassificationPreset when every current image has a label the model knows.
Outputs: reports/drift.html (self-contained), reports/drift.json, reports/drift.prom (Prometheus text),
reports/drift_quarantine.csv. A window cut by `--where site=C` (drift.where) records its filters in
`current.where` and the images before them in `current.n_before_where`.

Like with like (lensmith.drift.slices): each slice of the window (its images' site, per metadata.csv or the
prediction log's context) is compared with the matching slice of the reference's training rows, and Evidently's
reference is those rows. The decision (lensmith.drift.calibration) is per slice: a column drifts when its KS p-value
is below drift.p_value and its KS distance reaches drift.min_effect, and a slice drifts when the share of drifted
columns reaches the threshold calibrated on held-out reference windows of its size (drift.share_threshold for a
reference without a calibration). A value the reference never saw (a new site) is drift in itself. The report
states the expected false-alarm rate of its window (`false_alarm`), per slice (`slices`).
"""

from __future__ import annotations

import html
import importlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensmith.drift.calibration import Threshold, calibration_matches, slice_threshold, sorted_columns, window_tests
from lensmith.drift.current import (
    NOT_CONTEXT,
    STAT_COLUMNS,
    cell_text,
    CurrentWindow,
    WindowFilter,
    decoded_chunks,
    items_where,
    list_window,
    load_log_window,
    log_directory,
    parse_where,
    sampled_positions,
    sampling_note,
    where_note,
    where_text,
)
from lensmith.drift.embeddings import EmbeddingModel
from lensmith.drift.reference import Reference, load_reference, onnx_model_path, reference_paths
from lensmith.drift.slices import NEW_VALUE, TOO_SMALL, WHOLE, WindowSlice, slice_keys, status_text, window_slices
from lensmith.drift.trigger import Decision, SliceVerdict, decide_slices, relative_drop
from lensmith.errors import DataError
from lensmith.fsutil import atomic_path, file_sha256, write_csv_atomic, write_json_atomic, write_text_atomic
from lensmith.layout import Layout
from lensmith.params import AUTO, Params

DRIFT_JSON = "drift.json"
DRIFT_PROM = "drift.prom"  # Prometheus text for a textfile collector
DRIFT_HTML = "drift.html"
DRIFT_QUARANTINE = "drift_quarantine.csv"
NUM_METHOD = "ks"
CAT_METHOD = "chisquare"
PREDICTION_COLUMNS: tuple[str, ...] = ("predicted_label", "confidence")


@dataclass
class DriftResult:
    decision: Decision
    report: dict[str, Any]
    json_path: Path
    html_path: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def drift_detected(self) -> bool:
        return bool(self.report["drift_detected"])

    def __str__(self) -> str:
        r = self.report
        conf = r["confidence"]
        now = "n/a" if conf["now"] is None else f"{conf['now']:.3f}"
        lines = [
            f"drift: {r['current']['n_images']} images from {r['current']['source']}",
            f"  drifted columns {r['drifted_columns']}/{r['n_columns']} (share {r['drifted_share']:.2f}); "
            f"mean confidence {now} vs reference {conf['reference']:.3f}",
            f"  {false_alarm_text(r['false_alarm'])}",
            *(f"  slice {v['key']}: {slice_text(v)}" for v in r["slices"] if len(r["slices"]) > 1 or v["key"] != WHOLE),
            f"  quarantined {r['current']['n_quarantined']} file(s)" + (f" -> {r['current']['quarantine']}" if r["current"]["n_quarantined"] else ""),
            f"  decision: {self.decision.reason}",
            *(f"  note: {n}" for n in r["notes"]),
            f"  report: {self.html_path}  {self.json_path}",
        ]
        return "\n".join(lines)


# ---- which model and reference ------------------------------------------------------------------------


def resolve_model_dir(layout: Layout, model: str) -> Path:
    """'candidate' -> models/candidate; anything else is a registry alias or version."""
    if model == "candidate":
        return layout.candidate
    from lensmith.registry import Registry

    return Registry(layout.models).resolve(model)


def reference_for(layout: Layout, model_dir: Path) -> Reference:
    """The reference stored with the model; a registry version without one may use the candidate's
    when it was made from the very same model.onnx (the registry copies weights, not the reference)."""
    if reference_paths(model_dir)[0].is_file() or model_dir == layout.candidate:
        return load_reference(model_dir)
    candidate = layout.candidate
    onnx_file = onnx_model_path(layout, model_dir)
    if reference_paths(candidate)[0].is_file() and onnx_file.is_file():
        reference = load_reference(candidate)
        if reference.meta.get("model_sha256") == file_sha256(onnx_file):
            return reference
    return load_reference(model_dir)  # raises the missing-reference error naming model_dir


# ---- the current window -------------------------------------------------------------------------------


@dataclass
class CurrentData:
    window: CurrentWindow
    frame: pd.DataFrame  # stats (+ embedding components) (+ predictions) (+ label)
    embedding_seconds: float = 0.0
    decode_seconds: float = 0.0
    embedding_provider: str | None = None  # None: the window came with its predictions (the prediction log)


def embed_image_window(
    source: str, params: Params, layout: Layout, model_dir: Path, reference: Reference, where: list[WindowFilter] | None = None
) -> CurrentData:
    """Decode the window's images matching `where` (pool) and embed them chunk by chunk with ONNX Runtime."""
    listing = list_window(source, params, layout)
    if not listing.items:
        rejected = f" ({len(listing.rejections)} unusable entries)" if listing.rejections else ""
        raise DataError(f"empty window: no images under {listing.description}{rejected}; nothing to compare")
    where = where or []
    matching = items_where(listing, where)
    model = EmbeddingModel(onnx_model_path(layout, model_dir), layout.cache_dir, providers=params.drift.providers)
    n_listed, limit = len(matching), params.drift.max_window_images
    items = [matching[i] for i in sampled_positions(n_listed, limit, params.drift.seed)]
    rows, embeddings, probabilities, rejections = [], [], [], list(listing.rejections)
    started, embed_s = time.perf_counter(), 0.0
    for chunk in decoded_chunks(items, params, model.preprocessing):
        rows += chunk.rows
        rejections += chunk.rejections
        if len(chunk.rows):
            t = time.perf_counter()
            out = model.run_all(chunk.images, params.drift.batch_size)
            embed_s += time.perf_counter() - t
            embeddings.append(out.embeddings)
            probabilities.append(out.probabilities)
    frame = with_context(pd.DataFrame(rows, columns=["path", "label", *STAT_COLUMNS]), listing.metadata)
    description = listing.description + (f" where {where_text(where)}" if where else "")
    notes = [*where_note(where, n_listed, len(listing.items)), *sampling_note(n_listed, limit)]
    window = CurrentWindow(
        description, "images", frame, rejections, notes, n_listed,
        where=[str(f) for f in where], n_before_where=len(listing.items) if where else None,
    )
    if frame.empty:
        return CurrentData(window, frame, embedding_provider=model.provider)
    probs = np.concatenate(probabilities)
    components = reference.projection.transform(np.concatenate(embeddings))
    frame[reference.embedding_columns] = components
    frame["predicted_label"] = [model.classes[i] for i in probs.argmax(axis=1)]
    frame["confidence"] = probs.max(axis=1)
    return CurrentData(
        window, frame, embedding_seconds=embed_s, decode_seconds=time.perf_counter() - started - embed_s, embedding_provider=model.provider
    )


def with_context(frame: pd.DataFrame, metadata: pd.DataFrame | None) -> pd.DataFrame:
    """The window's rows with their metadata.csv columns (site, ...) as text, matched by path."""
    if metadata is None or frame.empty:
        return frame
    unique = metadata[~metadata.index.duplicated(keep="first")]
    columns = [c for c in unique.columns if str(c) not in NOT_CONTEXT and c not in frame.columns]
    context = unique.reindex(frame["path"])[columns].map(cell_text) if columns else None
    if context is None:
        return frame
    context.index = frame.index
    return pd.concat([frame, context.astype(object)], axis=1)


def load_current(
    source: str, since: str, params: Params, layout: Layout, model_dir: Path, reference: Reference, where: list[WindowFilter] | None = None
) -> CurrentData:
    directory = log_directory(source, params, layout)
    if directory is not None:
        window = load_log_window(directory, since, max_images=params.drift.max_window_images, seed=params.drift.seed, where=where or [])
        return CurrentData(window, window.frame)
    return embed_image_window(source, params, layout, model_dir, reference, where)


def check_not_empty(current: CurrentData, quarantine: Path) -> None:
    if not current.frame.empty:
        return
    window = current.window
    if window.rejections:
        raise DataError(
            f"empty window: all {len(window.rejections)} file(s) from {window.description} failed to decode "
            f"(reasons: {reason_counts(window.rejections)}); see {quarantine}"
        )
    raise DataError(f"empty window: no images in {window.description}; nothing to compare")


def reason_counts(rejections: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejections:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return counts


# ---- labels -------------------------------------------------------------------------------------------


def label_check(frame: pd.DataFrame, classes: list[str]) -> tuple[bool, dict[str, Any], list[str]]:
    """(run classification quality?, labels block, notes). Quality needs every image labelled with a known class."""
    if "label" not in frame.columns or frame["label"].isna().all():
        return False, {"present": False}, []
    labels = frame["label"].dropna().astype(str)
    unknown = sorted(set(labels) - set(classes))
    block = {"present": True, "n_labelled": int(len(labels)), "unknown": unknown, "model_classes": classes}
    notes = []
    if unknown:
        notes.append(
            f"current labels {unknown} are not classes of the model ({classes}): a different label set; "
            "classification quality is skipped (retrain with the new labels, or check the folder names)"
        )
    elif len(labels) < len(frame):
        notes.append(f"only {len(labels)} of {len(frame)} images are labelled: classification quality is skipped")
    return not unknown and len(labels) == len(frame), block, notes


# ---- Evidently ----------------------------------------------------------------------------------------


def monitored_columns(current: pd.DataFrame, reference: Reference) -> list[str]:
    """Statistics and embedding components present in the current window (log windows have no embeddings)."""
    candidates = [*STAT_COLUMNS, *reference.embedding_columns]
    return [c for c in candidates if c in current.columns and current[c].notna().any()]


def evidently_frames(
    current: pd.DataFrame, reference: Reference, columns: list[str], with_quality: bool, data_rows: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(current, reference) for Evidently. The reference's image columns come from `data_rows` (default: the rows drift
    is measured against); its predictions (and labels, for quality) only from the validation rows, as separate rows."""
    frame = reference.frame
    keep = [*columns, *PREDICTION_COLUMNS, "label"]
    data = (reference.comparison_rows() if data_rows is None else data_rows).reindex(columns=keep).copy()
    data[[*PREDICTION_COLUMNS, "label"]] = np.nan
    has_val = (frame["split"] == "val").any()
    predictions = frame[frame["split"] == ("val" if has_val else "train")].reindex(columns=keep).copy()
    predictions[columns] = np.nan
    ref = pd.concat([data, predictions], ignore_index=True)
    cur = current.reindex(columns=keep)
    if not with_quality:
        cur["label"] = np.nan
        ref["label"] = np.nan
    return cur, ref


def run_evidently(cur: pd.DataFrame, ref: pd.DataFrame, columns: list[str], with_quality: bool, dp: Any) -> Any:
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import ClassificationPreset, DataDriftPreset

    definition = DataDefinition(
        numerical_columns=[*columns, "confidence"],
        categorical_columns=["predicted_label", "label"],
        classification=[MulticlassClassification(target="label", prediction_labels="predicted_label")] if with_quality else None,
    )
    metrics: list[Any] = [
        DataDriftPreset(
            columns=columns, num_method=NUM_METHOD, cat_method=CAT_METHOD, drift_share=dp.share_threshold, threshold=dp.p_value
        ),
    ]
    if cur["predicted_label"].notna().any():
        metrics += [
            ValueDrift(column="predicted_label", method=CAT_METHOD, threshold=dp.p_value),
            ValueDrift(column="confidence", method=NUM_METHOD, threshold=dp.p_value),
        ]
    if with_quality:
        metrics.append(ClassificationPreset())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant columns (e.g. one image size) make numpy warn in correlations
        return Report(metrics).run(
            Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
        )


def value_drift_results(snapshot_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """column -> {method, threshold, p_value} from the snapshot's ValueDrift metrics."""
    results = {}
    for metric in snapshot_dict["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift"):
            results[config["column"]] = {
                "method": config.get("method"),
                "threshold": config.get("threshold"),
                "p_value": float(metric["value"]),
            }
    return results


def classification_quality(frame: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall of the window's predictions against its labels."""
    from sklearn.metrics import f1_score, recall_score

    y_true, y_pred = frame["label"].astype(str), frame["predicted_label"].astype(str)
    recalls = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    present = set(y_true)
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(present), average="macro", zero_division=0)),
        "recall_by_class": {c: float(r) for c, r in zip(classes, recalls) if c in present},
    }


def evidently_can_score(frame: pd.DataFrame) -> bool:
    # Evidently 0.7.23 treats exactly two labels as a binary task and fails looking up positive label 1
    return len(set(frame["label"].astype(str)) | set(frame["predicted_label"].astype(str))) > 2


def statistic(ref: pd.Series, cur: pd.Series, method: str) -> float | None:
    """The test statistic beside Evidently's p-value: KS distance or chi-square value."""
    from scipy import stats

    ref, cur = ref.dropna(), cur.dropna()
    if ref.empty or cur.empty:
        return None
    if method == NUM_METHOD:
        return float(stats.ks_2samp(ref.to_numpy(float), cur.to_numpy(float)).statistic)
    categories = sorted(set(ref.astype(str)) | set(cur.astype(str)))
    ref_counts = ref.astype(str).value_counts().reindex(categories, fill_value=0).to_numpy(float)
    cur_counts = cur.astype(str).value_counts().reindex(categories, fill_value=0).to_numpy(float)
    expected = ref_counts / ref_counts.sum() * cur_counts.sum()
    mask = expected > 0
    return float((((cur_counts - expected) ** 2)[mask] / expected[mask]).sum())


def column_rows(
    results: dict[str, dict[str, Any]], cur: pd.DataFrame, ref: pd.DataFrame, reference: Reference, min_effect: float = 0.0
) -> list[dict[str, Any]]:
    """Per column: Evidently's p-value beside the test statistic; an image column drifts only when its KS distance
    also reaches `min_effect` (the column test of lensmith.drift.calibration)."""
    rows = []
    for column, r in results.items():
        kind = "prediction" if column in PREDICTION_COLUMNS else "embedding" if column in reference.embedding_columns else "statistic"
        value = statistic(ref[column], cur[column], r["method"])
        drifted = r["p_value"] < (r["threshold"] if r["threshold"] is not None else 0.05)
        if kind != "prediction" and r["method"] == NUM_METHOD:
            drifted = drifted and value is not None and value >= min_effect
        row = {"column": column, "kind": kind, "method": r["method"], "statistic": value, "p_value": r["p_value"], "threshold": r["threshold"], "drifted": bool(drifted)}
        if cur[column].dtype.kind in "fiu":
            row.update(reference_mean=float(ref[column].dropna().mean()), current_mean=float(cur[column].dropna().mean()))
        rows.append(row)
    return rows


def class_distribution(labels: pd.Series, classes: list[str]) -> dict[str, float]:
    counts = labels.dropna().astype(str).value_counts()
    total = max(int(counts.sum()), 1)
    return {c: float(counts.get(c, 0)) / total for c in sorted(set(classes) | set(counts.index))}


# ---- slices and the calibrated decision ---------------------------------------------------------------


def window_slice_columns(reference: Reference, dp: Any) -> list[str]:
    """The columns the window is sliced by: those the reference was calibrated per (auto), or drift.slice_by."""
    return reference.slice_columns if dp.slice_by == AUTO else list(dp.slice_by)


def reference_slice_counts(rows: pd.DataFrame, keys: pd.Series) -> dict[str, int]:
    counts = {str(k): int(v) for k, v in keys.dropna().value_counts().items()}
    counts[WHOLE] = int(len(rows))
    return counts


@dataclass(frozen=True)
class ConfidenceRule:
    """A slice's confidence rule: trigger when its mean confidence falls `threshold` (relative) below `reference`."""

    reference: float
    threshold: float
    calibrated: bool  # chosen jointly with the share on held-out windows; else drift.confidence_drop


def slice_confidence(current: pd.DataFrame, positions: np.ndarray) -> float | None:
    if "confidence" not in current.columns:
        return None
    values = current["confidence"].iloc[positions].dropna()
    return float(values.mean()) if len(values) else None


def slice_verdict(
    piece: WindowSlice, current: pd.DataFrame, rows: pd.DataFrame, columns: list[str], threshold: Threshold, dp: Any,
    confidence_rule: ConfidenceRule | None = None,
) -> SliceVerdict:
    """Compare one slice of the window with its reference rows by the calibrated column test, and its mean confidence
    by `confidence_rule` when given."""
    n = len(piece.positions)
    if piece.status == TOO_SMALL:
        return SliceVerdict(piece.key, piece.status, n, piece.reference_rows, None, None, None, False, False, status_text(piece, dp.min_slice_rows))
    tests = window_tests(sorted_columns(rows, columns), current.iloc[piece.positions], columns, dp.p_value, dp.min_effect)
    share = sum(t.drifted for t in tests) / len(tests) if tests else 0.0
    judged = n >= dp.min_window
    new = piece.status == NEW_VALUE
    share_drifted = share >= threshold.share
    label = "" if piece.key == WHOLE else f"{piece.key}: "
    conf_now = slice_confidence(current, piece.positions)
    rule = confidence_rule if judged and not new and conf_now is not None else None
    drop = relative_drop(conf_now, rule.reference) if rule else None
    conf_drifted = drop is not None and rule is not None and drop >= rule.threshold - 1e-12
    drifted = judged and (new or share_drifted or conf_drifted)
    if new:
        reason = f"{piece.key}: a value the reference has never seen (new slice); drifted share {share:.2f} against the whole reference"
    elif not judged:
        reason = f"{label}{n} image(s) < drift.min_window {dp.min_window}: reported, not judged"
    elif rule is None or drop is None:
        reason = f"{label}drifted share {share:.2f} {'>=' if share_drifted else '<'} {threshold.text()}"
    else:
        source = "calibrated" if rule.calibrated else "drift.confidence_drop"
        confidence = (f"mean confidence fell {drop:.1%} ({rule.reference:.3f} -> {conf_now:.3f}) >= {source} {rule.threshold:.1%}"
                      if conf_drifted else f"confidence change {drop:+.1%} below a {source} {rule.threshold:.1%} drop")
        share_part = f"drifted share {share:.2f} {'>=' if share_drifted else '<'} {threshold.text()}"
        reason = f"{label}{confidence}; {share_part}" if conf_drifted else f"{label}{share_part}; {confidence}"
    return SliceVerdict(
        piece.key, piece.status, n, piece.reference_rows, share, threshold.share, threshold.false_alarm_rate, judged, drifted, reason,
        confidence_now=conf_now, confidence_reference=rule.reference if rule else None, confidence_drop=drop,
        confidence_threshold=rule.threshold if rule else None, confidence_calibrated=bool(rule and rule.calibrated),
    )


def confidence_rules(thresholds: list[Threshold], judged: list[bool], reference: Reference, dp: Any) -> list[ConfidenceRule | None]:
    """Per slice, its confidence rule: the calibrated one, or when another judged slice of the window is calibrated (so
    the window's own rule is off) drift.confidence_drop against the reference's mean; all None when none is calibrated,
    and the window's mean confidence is judged as a whole (decide_slices)."""
    if not any(t.confidence_calibrated and j for t, j in zip(thresholds, judged)):
        return [None] * len(thresholds)
    return [
        ConfidenceRule(t.confidence_reference, t.confidence_drop, True)  # type: ignore[arg-type]
        if t.confidence_calibrated else ConfidenceRule(reference.mean_confidence, dp.confidence_drop, False)
        for t in thresholds
    ]


@dataclass
class SlicedComparison:
    verdicts: list[SliceVerdict]
    evidently_rows: pd.DataFrame  # the reference rows Evidently compares the window with
    notes: list[str]
    calibrated: bool


def has_confidence(current: pd.DataFrame) -> bool:
    return "confidence" in current.columns and bool(current["confidence"].notna().any())


def sliced_comparison(current: pd.DataFrame, reference: Reference, columns: list[str], dp: Any) -> SlicedComparison:
    """Each slice of the window against its reference slice, judged at the false-alarm rate drift.false_alarm_rate
    shared among the judged slices: on its data drift and, when the reference calibrated it, its mean confidence."""
    rows = reference.comparison_rows()
    slice_by = window_slice_columns(reference, dp)
    ref_keys = slice_keys(rows, slice_by)
    pieces = window_slices(slice_keys(current, slice_by), reference_slice_counts(rows, ref_keys), dp.min_slice_rows)
    calibration = reference.calibration if calibration_matches(reference.calibration, dp.p_value, dp.min_effect) else None
    notes = []
    if reference.calibration and calibration is None:
        notes.append(f"the reference was calibrated at p_value {reference.calibration.get('p_value')} / min_effect "
                     f"{reference.calibration.get('min_effect')}, not {dp.p_value} / {dp.min_effect}: drift.share_threshold applies; rebuild the reference")
    elif not reference.calibration:
        notes.append("the reference carries no false-alarm calibration (no validation rows, or an older reference): "
                     "drift.share_threshold applies; rebuild it with `lensmith drift-reference`")
    elif not any("confidence_drops" in e for e in reference.calibration.get("slices", {}).values()) and has_confidence(current):
        notes.append("the reference's calibration holds no confidence drops of its held-out windows (made before they were "
                     f"calibrated): drift.confidence_drop {dp.confidence_drop:.0%} applies as a fixed rule to the window's mean "
                     "confidence, and the expected false-alarm rate covers data drift only; rebuild it with `lensmith drift-reference`")
    judged = [p for p in pieces if p.status not in (TOO_SMALL, NEW_VALUE) and len(p.positions) >= dp.min_window]
    alpha = dp.false_alarm_rate / max(1, len(judged))
    floor = dp.confidence_drop if has_confidence(current) else None
    thresholds = [slice_threshold(calibration, p.reference_key or WHOLE, columns, len(p.positions), alpha, dp.share_threshold, floor)
                  for p in pieces]
    verdicts = []
    rules = confidence_rules(thresholds, [any(p is q for q in judged) for p in pieces], reference, dp)
    for piece, threshold, rule in zip(pieces, thresholds, rules):
        slice_rows = rows if piece.reference_key in (None, WHOLE) else rows[ref_keys == piece.reference_key]
        verdicts.append(slice_verdict(piece, current, slice_rows, columns, threshold, dp, rule))
    compared = {p.reference_key for p in pieces if p.reference_key is not None}
    evidently_rows = rows if (WHOLE in compared or not compared) else rows[ref_keys.isin(compared)]
    return SlicedComparison(verdicts, evidently_rows, notes, calibration is not None)


def false_alarm_block(comparison: SlicedComparison, n_images: int, dp: Any) -> dict[str, Any]:
    """The expected false-alarm rate of this window's decision: the sum over its judged slices (a union bound), of
    the combined rule (share or confidence drop) when the reference calibrated both, else of the share alone."""
    judged = [v for v in comparison.verdicts if v.judged and v.status != NEW_VALUE]
    rates = [v.false_alarm_rate for v in judged]
    calibrated = bool(judged) and all(r is not None for r in rates)
    # the confidence rule is covered when every judged slice judged it calibrated (or none has confidences to judge)
    covered = calibrated and all(v.confidence_calibrated or v.confidence_now is None for v in judged)
    return {
        "expected": float(min(1.0, sum(rates))) if calibrated else None,  # type: ignore[arg-type]
        "rule": "share or confidence drop" if covered else "share only" if calibrated else None,
        "confidence_calibrated": covered,
        "target": dp.false_alarm_rate,
        "calibrated": calibrated,
        "window_images": n_images,
        "judged_slices": len(judged),
        "min_effect": dp.min_effect,
        "p_value": dp.p_value,
        "confidence_floor": dp.confidence_drop,
    }


def false_alarm_text(block: dict[str, Any]) -> str:
    if block["expected"] is None:
        return f"false-alarm rate: not calibrated for this window (target {block['target']:.0%}); see the notes"
    rule = ("drifted share or confidence drop" if block.get("confidence_calibrated", True)
            else "drifted share only; the fixed confidence rule is not calibrated")
    return (f"expected false-alarm rate {block['expected']:.1%} for {block['window_images']} images "
            f"(target {block['target']:.0%}; {rule}; calibrated on held-out reference windows; {block['judged_slices']} slice(s) judged)")


def slice_text(verdict: dict[str, Any]) -> str:
    return f"{verdict['n_images']} images vs {verdict['reference_rows']} reference rows ({verdict['status']}): {verdict['reason']}"


# ---- outputs ------------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively: drift.json must be strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def decision_banner(decision: Decision, report: dict[str, Any]) -> str:
    colour = "#b00020" if decision.retrain else "#1b5e20"
    conf = report["confidence"]
    now = "n/a" if conf["now"] is None else f"{conf['now']:.3f}"
    return (
        f'<div style="font-family:sans-serif;padding:12px 16px;margin:8px;border-left:6px solid {colour};background:#f7f7f7">'
        f"<b>Lensmith drift: {html.escape(decision.reason)}</b><br>"
        f"window: {report['current']['n_images']} images from {html.escape(str(report['current']['source']))}; "
        f"drifted {report['drifted_columns']}/{report['n_columns']} columns (share {report['drifted_share']:.2f}); "
        f"mean confidence {now} vs reference {conf['reference']:.3f}; model {html.escape(str(report['model']['version']))}"
        f"<br>{html.escape(false_alarm_text(report['false_alarm']))}"
        + "".join(f"<br>slice {html.escape(str(v['key']))}: {html.escape(slice_text(v))}" for v in report["slices"] if len(report["slices"]) > 1 or v["key"] != WHOLE)
        + "".join(f"<br>note: {html.escape(n)}" for n in report["notes"])
        + "</div>"
    )


def save_html(snapshot: Any, target: Path, banner: str) -> None:
    """Evidently's self-contained page with the decision banner at the top of <body>."""
    page = snapshot.get_html_str(as_iframe=False)
    marker = page.find("<body")
    if marker >= 0:
        end = page.find(">", marker) + 1
        page = page[:end] + banner + page[end:]
    with atomic_path(target, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def preload_evidently() -> threading.Thread:
    """Import Evidently in the background: its import costs ~7 s of CPU, which then overlaps the decode
    pool and ONNX Runtime (both outside the GIL). A failed import resurfaces at the real import."""

    def load() -> None:
        try:
            importlib.import_module("evidently")
        except Exception:  # noqa: BLE001, S110 - run_evidently's own import reports it
            pass

    thread = threading.Thread(target=load, name="import-evidently", daemon=True)
    thread.start()
    return thread


def live_quality_block(params: Params, layout: Layout, model_dir: Path) -> dict[str, Any]:
    """Defect recall / false-alarm rate of served decisions per the review queue's corrections (lensmith.livequality)."""
    from lensmith.jsondoc import dig, read_json_or_none
    from lensmith.livequality import queue_quality
    from lensmith.serve.review import read_queue

    rule = (dig(read_json_or_none(model_dir / "meta.json"), "decision")  # a registry version
            or dig(read_json_or_none(model_dir / "export.json"), "decision.rule")
            or dig(read_json_or_none(layout.exported / "export.json"), "decision.rule"))  # the candidate's export
    positive = (rule or {}).get("positive_classes") or [] if isinstance(rule, dict) and rule.get("kind") == "threshold" else []
    queue_dir = layout.root / params.serve.review_dir
    items = read_queue(queue_dir) if queue_dir.is_dir() else []
    return queue_quality(items, positive, params.gate.min_positive_recall)


def prometheus_text(report: dict[str, Any]) -> str:
    """The decision as Prometheus text (node_exporter's textfile collector reads reports/drift.prom), for alerts."""
    live = report.get("live_quality") or {}
    values = {
        "lensmith_drift_drifted_share": ("Share of drifted columns in the last drift check", report["drifted_share"]),
        "lensmith_drift_retrain": ("1 when the last drift check asked for retraining", 1 if report["decision"]["retrain"] else 0),
        "lensmith_drift_report_timestamp_seconds": ("When the last drift check ran", datetime.fromisoformat(report["created"]).timestamp()),
        "lensmith_drift_live_defect_recall": ("Defect recall per the review queue's corrections", live.get("defect_recall")),
        "lensmith_drift_expected_false_alarm_rate": ("Expected false-alarm rate of the last drift check's decision", (report.get("false_alarm") or {}).get("expected")),
    }
    lines = []
    for name, (text, value) in values.items():
        shown = "NaN" if value is None else repr(float(value))
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {shown}"]
    return "\n".join(lines) + "\n"


def run_drift(
    params: Params, layout: Layout, source: str, since: str | None = None, model: str | None = None, where: list[str] | None = None
) -> DriftResult:
    """Compare `source` (folder, s3:// prefix, or the prediction log), cut by `where` (["site=C"]; default
    drift.where), with the model's reference; write the reports."""
    dp = params.drift
    started = time.perf_counter()
    filters = parse_where(dp.where if where is None else where)
    evidently_import = preload_evidently()
    model_dir = resolve_model_dir(layout, model or dp.model)
    reference = reference_for(layout, model_dir)
    current = load_current(source, since or dp.since, params, layout, model_dir, reference, filters)
    quarantine = layout.reports / DRIFT_QUARANTINE
    write_csv_atomic(quarantine, pd.DataFrame([r.__dict__ for r in current.window.rejections], columns=["path", "reason", "detail"]))
    check_not_empty(current, quarantine)

    frame = current.frame
    with_quality, labels_block, label_notes = label_check(frame, reference.classes)
    columns = monitored_columns(frame, reference)
    in_evidently = with_quality and evidently_can_score(frame)
    comparison = sliced_comparison(frame, reference, columns, dp)
    cur, ref = evidently_frames(frame, reference, columns, in_evidently, comparison.evidently_rows)
    t = time.perf_counter()
    evidently_import.join()
    snapshot = run_evidently(cur, ref, columns, in_evidently, dp)
    evidently_s = time.perf_counter() - t
    snap = snapshot.dict()
    per_column = column_rows(value_drift_results(snap), cur, ref, reference, dp.min_effect)
    data_rows = [r for r in per_column if r["kind"] != "prediction"]
    drifted = sum(r["drifted"] for r in data_rows)
    share = drifted / len(data_rows) if data_rows else 0.0
    conf_now = float(frame["confidence"].mean()) if frame["confidence"].notna().any() else None
    decision = decide_slices(comparison.verdicts, conf_now, reference.mean_confidence, len(frame), dp)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "drift_detected": any(v.drifted for v in comparison.verdicts),
        "drifted_share": share,
        "drifted_columns": int(drifted),
        "n_columns": len(data_rows),
        "columns": per_column,
        "confidence": {
            "now": conf_now,
            "reference": reference.mean_confidence,
            "relative_drop": relative_drop(conf_now, reference.mean_confidence),
        },
        "predictions": {
            "class_distribution_now": class_distribution(frame["predicted_label"], reference.classes),
            "class_distribution_reference": reference.meta["predictions"]["class_distribution"],
        },
        "classification": {**classification_quality(frame, reference.classes), "reference_accuracy": reference.meta["predictions"].get("accuracy")} if with_quality else None,
        "labels": labels_block,
        "decision": decision.to_dict(),
        "false_alarm": false_alarm_block(comparison, len(frame), dp),
        "slices": [v.to_dict() for v in comparison.verdicts],
        "slice_by": window_slice_columns(reference, dp),
        "current": {
            "source": current.window.description,
            "kind": current.window.kind,
            "n_images": int(len(frame)),
            "n_in_window": current.window.n_in_window,
            "where": current.window.where,
            "n_before_where": current.window.n_before_where,
            "n_quarantined": len(current.window.rejections),
            "quarantine_reasons": reason_counts(current.window.rejections),
            "quarantine": str(quarantine),
            "embedding_provider": current.embedding_provider,
        },
        "model": {"dir": str(model_dir), "version": reference.meta.get("model_version"), "reference_created": reference.meta.get("created")},
        "thresholds": {"share_threshold": dp.share_threshold, "min_effect": dp.min_effect, "false_alarm_rate": dp.false_alarm_rate, "confidence_drop": dp.confidence_drop, "p_value": dp.p_value, "min_window": dp.min_window, "num_method": NUM_METHOD, "cat_method": CAT_METHOD},
        "notes": [*current.window.notes, *label_notes, *comparison.notes],
    }
    html_path, json_path = layout.reports / DRIFT_HTML, layout.reports / DRIFT_JSON
    t = time.perf_counter()
    save_html(snapshot, html_path, decision_banner(decision, report))
    html_s = time.perf_counter() - t
    seconds = {
        "decode": round(current.decode_seconds, 3),
        "embedding": round(current.embedding_seconds, 3),
        "evidently": round(evidently_s, 3),
        "html": round(html_s, 3),
        "total": round(time.perf_counter() - started, 3),
    }
    report["seconds"] = seconds
    report["live_quality"] = live_quality_block(params, layout, model_dir)
    if report["live_quality"]["below_floor"]:
        report["notes"].append(
            f"corrections say the served model's defect recall is {report['live_quality']['defect_recall']:.3f}, "
            f"below the gate's floor {report['live_quality']['floor']} (from {report['live_quality']['defects']} corrected defects)"
        )
    report = json_safe(report)
    write_json_atomic(json_path, report)
    write_text_atomic(layout.reports / DRIFT_PROM, prometheus_text(report))
    return DriftResult(decision, report, json_path, html_path, seconds)
