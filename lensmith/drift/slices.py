"""Like with like: which context columns slice the drift comparison, and which reference rows a window's slice meets.

A window from one site is compared with that site's rows of the reference, not with a reference that mixes every
site (a one-site window always looks different from a mix). Slices are keyed by the values of `drift.slice_by`
(`site=A`, `line=2 site=A`); auto picks the metadata columns every production batch holds a single value of (site,
line: where a batch was made), not those that vary inside a batch (lighting, camera) nor the batch column itself.

A slice of the window is, per the reference:
- compared: enough reference training rows with that key (drift.min_slice_rows);
- too_small: the reference holds that key, but too few rows to compare with (said so, not guessed);
- new_value: a value the reference has never seen (a new site): drift in itself, and compared with the whole
  reference so the report shows how far it is;
- whole: the window carries no value for the columns (or nothing slices): compared with the whole reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lensmith.drift.current import cell_text
from lensmith.params import AUTO, DriftParams
from lensmith.resolve import MAX_SLICE_VALUES, group_column_of

WHOLE = "all"  # the key of the whole reference
COMPARED, TOO_SMALL, NEW_VALUE, WHOLE_REFERENCE = "compared", "too_small", "new_value", "whole"


def site_like_columns(frame: pd.DataFrame, columns: Sequence[str], group_column: str | None) -> list[str]:
    """The `columns` with 2..MAX_SLICE_VALUES values of which every group (batch) holds exactly one."""
    if group_column is None or group_column not in frame.columns:
        return []
    chosen = []
    for column in columns:
        if column == group_column or column not in frame.columns:
            continue
        values = frame[column].map(cell_text)
        if not 2 <= values.nunique(dropna=True) <= MAX_SLICE_VALUES:
            continue
        if (values.groupby(frame[group_column].map(cell_text)).nunique(dropna=True) <= 1).all():
            chosen.append(column)
    return chosen


def resolved_slice_columns(dp: DriftParams, frame: pd.DataFrame, context_columns: Sequence[str]) -> tuple[list[str], str]:
    """(slice columns, why): drift.slice_by, or for auto the site-like context columns of `frame`."""
    if dp.slice_by != AUTO:
        missing = [c for c in dp.slice_by if c not in context_columns]
        chosen = [c for c in dp.slice_by if c in context_columns]
        why = "drift.slice_by" + (f" (not in the reference's context columns: {missing})" if missing else "")
        return chosen, why
    group = group_column_of(list(context_columns))
    chosen = site_like_columns(frame, context_columns, group)
    if group is None:
        return [], "auto: no batch column in the metadata, so no site-like column can be told apart: the whole reference"
    if not chosen:
        return [], f"auto: no metadata column holds one value per batch ({group!r}): the whole reference"
    return chosen, f"auto: the metadata columns each batch ({group!r}) holds one value of"


def slice_keys(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Per row, 'site=A line=2' (columns in order); None where a column is absent or empty (no context)."""
    keys = pd.Series([WHOLE if not columns else ""] * len(frame), index=frame.index, dtype=object)
    missing = pd.Series(False, index=frame.index)
    for i, column in enumerate(columns):
        values = frame[column].map(cell_text) if column in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        missing |= values.isna()
        keys = keys + (" " if i else "") + f"{column}=" + values.fillna("").astype(str)
    keys[missing] = None
    return keys


@dataclass(frozen=True)
class WindowSlice:
    """One slice of the current window and what it is compared with."""

    key: str  # 'site=A', or WHOLE / '(no context)'
    positions: np.ndarray  # rows of the window
    status: str  # COMPARED | TOO_SMALL | NEW_VALUE | WHOLE_REFERENCE
    reference_key: str | None  # the reference slice compared with; None when not compared
    reference_rows: int  # reference training rows with this key (0 for a new value)


def window_slices(window_keys: pd.Series, reference_counts: dict[str, int], min_rows: int) -> list[WindowSlice]:
    """The window's slices (largest first) against the reference's training-row counts per key."""
    keys = window_keys.fillna("(no context)").to_numpy(dtype=object)
    slices = []
    for key in sorted(set(keys), key=lambda k: (-int((keys == k).sum()), str(k))):
        positions = np.flatnonzero(keys == key)
        rows = int(reference_counts.get(key, 0))
        if key in (WHOLE, "(no context)"):
            slices.append(WindowSlice(key, positions, WHOLE_REFERENCE, WHOLE, int(reference_counts.get(WHOLE, 0))))
        elif rows == 0:
            slices.append(WindowSlice(key, positions, NEW_VALUE, WHOLE, 0))
        elif rows < min_rows:
            slices.append(WindowSlice(key, positions, TOO_SMALL, None, rows))
        else:
            slices.append(WindowSlice(key, positions, COMPARED, key, rows))
    return slices


def status_text(piece: WindowSlice, min_rows: int) -> str:
    """What the report says about a slice that is not simply compared."""
    if piece.status == NEW_VALUE:
        return f"{piece.key}: a value the reference has never seen (new slice, drift in itself): compared with the whole reference"
    if piece.status == TOO_SMALL:
        return (f"{piece.key}: the reference holds only {piece.reference_rows} training row(s) of it (< drift.min_slice_rows "
                f"{min_rows}): too small to compare with, not judged")
    if piece.key == "(no context)":
        return "images without context values: compared with the whole reference"
    return ""
