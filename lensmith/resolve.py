"""Settings that depend on the data, resolved from it when params leave them at `auto`.

A plain image folder has no metadata, a plant's CSV has its own columns, the demo declares site,
lighting, camera and batch: the same params must fit all of them. Each stage that needs one of
these settings resolves it here from what it reads (manifest or splits, the model's classes), so
the result is a function of the stage's inputs and params, and `dvc repro` stays reproducible.
What a setting resolved to, and why, is written into the reports and the model's meta.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lensmith.params import AUTO, Params
from lensmith.schema import MANIFEST_COLUMNS, REVIEW_COLUMNS, SPLIT_ADDED_COLUMNS

# Columns ingest and split write for every image, and the provenance of reviewed images; any other column came
# from a source's metadata.
SYSTEM_COLUMNS: frozenset[str] = frozenset((*MANIFEST_COLUMNS, *SPLIT_ADDED_COLUMNS, *REVIEW_COLUMNS))
# Label names that mean "nothing wrong here", in order of preference (compared case-insensitively, - and space as _).
NEGATIVE_CLASS_NAMES: tuple[str, ...] = (
    "ok", "good", "normal", "pass", "passed", "no_defect", "nodefect", "non_defective", "defect_free", "okay",
    "clean", "accept", "accepted", "negative",
)
GROUP_COLUMN_NAMES: tuple[str, ...] = ("batch", "lot", "group", "group_id", "batch_id", "lot_id")
MAX_SLICE_VALUES = 50  # a column with more distinct values is an identifier, not a slice


@dataclass(frozen=True)
class Resolved:
    """The data-dependent settings of one run and, for each, where its value came from."""

    metadata_columns: tuple[str, ...]
    required_metadata: tuple[str, ...]
    group_column: str | None
    slices: tuple[str, ...]
    negative_class: str | None
    positive_class: str | None
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def has_defect_view(self) -> bool:
        """True when metrics split classes into positive (defect) and negative (good)."""
        return self.positive_class is not None or self.negative_class is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "metadata_columns": list(self.metadata_columns),
            "validate.required_metadata": list(self.required_metadata),
            "split.group_column": self.group_column,
            "evaluate.slices": list(self.slices),
            "evaluate.negative_class": self.negative_class,
            "evaluate.positive_class": self.positive_class,
            "reasons": dict(self.reasons),
        }

    def model_dict(self) -> dict[str, Any]:
        """What a trained model records in meta.json: its metadata columns and its good class."""
        keys = ("evaluate.negative_class", "evaluate.positive_class")
        return {
            "metadata_columns": list(self.metadata_columns),
            "evaluate.negative_class": self.negative_class,
            "evaluate.positive_class": self.positive_class,
            "reasons": {k: v for k, v in self.reasons.items() if k in keys},
        }

    def lines(self) -> list[str]:
        shown = {
            "validate.required_metadata": list(self.required_metadata),
            "split.group_column": self.group_column,
            "evaluate.slices": list(self.slices),
            "evaluate.negative_class": self.negative_class,
        }
        return [f"{key} = {value!r} ({self.reasons.get(key, 'params')})" for key, value in shown.items()]


def metadata_columns(columns: Sequence[str]) -> list[str]:
    """The columns a source declared as metadata (metadata.csv / CSV manifest), in their order."""
    return [str(c) for c in columns if str(c) not in SYSTEM_COLUMNS]


def rows_of_data_source(params: Params, frame: pd.DataFrame) -> pd.Series:
    """Whether each row came from data.source (all rows of a manifest written before rows recorded their source)."""
    if "source" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["source"].isna() | (frame["source"].astype(str) == params.data.source)


def declared_by_data_source(params: Params, frame: pd.DataFrame, declared: Sequence[str]) -> list[str]:
    """The metadata columns data.source declares: those with a value in one of its rows. Columns only other
    sources (data.sources, the reviewed folder's request context) bring are not required of every image."""
    rows = frame[rows_of_data_source(params, frame)]
    if rows.empty or len(rows) == len(frame):
        return list(declared)
    return [c for c in declared if rows[c].notna().any()]


def normalised_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def negative_class_of(labels: Sequence[str]) -> str | None:
    """The label that names the good class (ok, good, normal, pass, ...), or None when no label does."""
    by_name = {normalised_name(label): str(label) for label in labels}
    for name in NEGATIVE_CLASS_NAMES:
        if name in by_name:
            return by_name[name]
    return None


def group_column_of(columns: Sequence[str]) -> str | None:
    by_name = {normalised_name(c): c for c in columns}
    for name in GROUP_COLUMN_NAMES:
        if name in by_name:
            return by_name[name]
    return None


def slice_columns_of(frame: pd.DataFrame, columns: Sequence[str], group_column: str | None) -> tuple[list[str], list[str]]:
    """(slice columns, skipped columns): metadata columns other than the group column with at most 50 values
    (more is an identifier). Resolve on the whole data (manifest, or all splits), not on one split."""
    chosen, skipped = [], []
    for column in columns:
        if column == group_column:
            continue
        values = frame[column].nunique(dropna=True) if column in frame.columns else 0
        (chosen if values <= MAX_SLICE_VALUES else skipped).append(column)
    return chosen, skipped


def resolve(params: Params, frame: pd.DataFrame, labels: Sequence[str]) -> Resolved:
    """Resolve every `auto` setting against `frame` (manifest or splits) and the label set."""
    declared = metadata_columns(list(frame.columns))
    reasons: dict[str, str] = {}

    if params.validate.required_metadata == AUTO:
        required = tuple(declared_by_data_source(params, frame, declared))
        reasons["validate.required_metadata"] = (
            "auto: the metadata columns data.source declares, required of its rows"
            if required else "auto: data.source declares no metadata"
        )
    else:
        required = tuple(params.validate.required_metadata)

    if params.split.group_column == AUTO:
        group = group_column_of(declared)
        reasons["split.group_column"] = (
            f"auto: the source's {group!r} column" if group else "auto: no batch/lot column, exact and near-duplicates only"
        )
    else:
        group = params.split.group_column

    if params.evaluate.slices == AUTO:
        chosen, skipped = slice_columns_of(frame, declared, group)
        slices = tuple(chosen)
        note = "auto: the declared metadata columns"
        if group in declared:
            note += f" except the group column {group!r}"
        if skipped:
            note += f"; not {', '.join(skipped)} (more than {MAX_SLICE_VALUES} values: an identifier)"
        reasons["evaluate.slices"] = note if declared else "auto: the source declares no metadata"
    else:
        slices = tuple(params.evaluate.slices)

    positive = params.evaluate.positive_class
    if params.evaluate.negative_class == AUTO:
        negative = negative_class_of(labels) if positive is None else None
        if positive is not None:
            reasons["evaluate.negative_class"] = "auto: not needed, evaluate.positive_class is set"
        elif negative is not None:
            reasons["evaluate.negative_class"] = f"auto: the label {negative!r} names the good class"
        else:
            reasons["evaluate.negative_class"] = (
                f"auto: no label is one of {', '.join(NEGATIVE_CLASS_NAMES[:6])}, ...: "
                "no defect-vs-ok view, multi-class metrics only"
            )
    else:
        negative = params.evaluate.negative_class
    return Resolved(tuple(declared), required, group, slices, negative, positive, reasons)
