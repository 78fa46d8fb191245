"""The data gate (Great Expectations 1.x): the manifest checks and, after split, the leakage checks.

Every check is a real GX expectation whose result is read back; aggregate checks (per-class
counts, balance, cross-split sharing) run as expectations on small frames derived from the manifest.
Both entry points write a JSON and a self-contained HTML report, then raise `GateFailedError`
(exit code 1) when a blocking check failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lensmith.errors import DataError, GateFailedError
from lensmith.labelslock import pin_labels, pinned_labels
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.neardup import hamming_distance, near_duplicate_groups
from lensmith.params import AUTO, Params, SplitParams, ValidateParams
from lensmith.resolve import Resolved, resolve, rows_of_data_source
from lensmith.validation import gxrun  # first: it switches GX analytics off before GX is imported
from lensmith.validation.gxrun import MAX_EXAMPLES, Check, Frame
from lensmith.validation.report import (
    ValidationResult,
    gate_failure_message,
    precondition_failure,
    write_precondition_report,
    write_reports,
)

import great_expectations.expectations as gxe  # noqa: E402, I001
from great_expectations.expectations.metadata_types import FailureSeverity  # noqa: E402

MANIFEST_COLUMNS = ("path", "label", "sha256", "width", "height", "mode", "brightness", "contrast", "sharpness", "phash")
SPLIT_COLUMNS = ("path", "sha256", "phash")
PHASH_PATTERN = r"^[0-9a-fA-F]{16}$"

__all__ = ["ValidationResult", "run_validate", "check_split_leakage", "leakage_report_paths", "expected_labels"]


# ---------------------------------------------------------------- inputs


def read_table(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a parquet table, failing with a DataError that names the missing file or columns."""
    if not path.exists():
        raise DataError(f"{what} not found: {path} (run the stage that writes it first)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{what} {path} cannot be read as parquet: {exc}") from None
    require_columns(frame, required, f"{what} {path}")
    return frame.reset_index(drop=True)


def require_columns(frame: pd.DataFrame, required: Sequence[str], what: str, hint: str = "") -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lacks required column(s): {', '.join(missing)}{hint}")


def expected_labels(params: ValidateParams, layout: Layout, manifest_labels: Sequence[str]) -> tuple[list[str], str]:
    """(label set to expect, where it came from): validate.labels, else labels.lock.json, else pinned now."""
    if params.labels is not None:
        return sorted(params.labels), "validate.labels in params.yaml"
    lock = layout.labels_lock
    if lock.exists():
        return pinned_labels(lock), f"{lock.name} (pinned on an earlier run)"
    return pin_labels(lock, manifest_labels), f"{lock.name} (pinned now from the manifest)"


# ---------------------------------------------------------------- derived frames


def with_derived_columns(manifest: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """The manifest plus `pixels`, `near_duplicate_group` and `near_duplicate_distinct_images`."""
    frame = manifest.copy()
    frame["label"] = frame["label"].astype(str)
    frame["pixels"] = frame["width"].astype("int64") * frame["height"].astype("int64")
    frame["near_duplicate_group"] = near_duplicate_groups(valid_phashes(frame["phash"]), max_distance)
    # Copies of one file (same sha256) are exact duplicates, a separate check: count distinct files.
    frame["near_duplicate_distinct_images"] = frame.groupby("near_duplicate_group")["sha256"].transform("nunique")
    # One image under two labels (e.g. data.source says ok, a correction says crack): a label conflict.
    frame["sha256_labels"] = frame.groupby("sha256")["label"].transform("nunique")
    return frame


def valid_phashes(phash: pd.Series) -> list[str | None]:
    """Phash strings, with malformed ones as None (they get their own group; the phash check reports them)."""
    ok = phash.astype("string").str.fullmatch(PHASH_PATTERN).fillna(False).to_numpy(dtype=bool)
    return [p if good else None for p, good in zip(phash.tolist(), ok)]


def class_count_frame(labels: pd.Series, expected: Sequence[str]) -> pd.DataFrame:
    """One row per label (expected or seen): `count` and `count_over_smallest` (vs the smallest present class)."""
    counts = labels.astype(str).value_counts()
    all_labels = sorted(set(expected) | set(counts.index))
    frame = pd.DataFrame({"label": all_labels, "count": [int(counts.get(label, 0)) for label in all_labels]})
    present = frame["count"][frame["count"] > 0]
    smallest = int(present.min()) if len(present) else 1
    frame["count_over_smallest"] = frame["count"] / smallest
    return frame


# ---------------------------------------------------------------- the suites


def manifest_checks(
    params: ValidateParams,
    labels: list[str],
    label_source: str,
    metadata_present: Sequence[str] = (),
    split: SplitParams | None = None,
    metadata_wished: Sequence[str] = (),
) -> list[Check]:
    """The manifest suite, built from params (row checks on `manifest`, aggregate checks on `classes`,
    params-vs-data checks on `params`). `metadata_present`: the required metadata columns the manifest has, checked
    (blocking) on the `required_rows` frame; `metadata_wished`: those checked as a warning on `other_rows` (rows of
    data.sources and the reviewed folder when required_metadata is auto)."""
    label_hint = (
        f"Expected labels come from {label_source}; to accept a changed label set, "
        "add the labels to validate.labels in params.yaml or delete labels.lock.json to re-pin"
    )
    lo, hi = params.brightness_range
    near_dup = gxe.ExpectColumnValuesToBeBetween(column="near_duplicate_distinct_images", max_value=1)
    if not params.fail_on_near_duplicates:
        near_dup.severity = FailureSeverity.WARNING
    return [
        Check("path_unique", "manifest", gxe.ExpectColumnValuesToBeUnique(column="path")),
        Check("label_in_expected_set", "manifest", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels), label_hint),
        Check("expected_labels_present", "classes", gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1), label_hint),
        Check(
            "min_images_per_class",
            "classes",
            gxe.ExpectColumnValuesToBeBetween(column="count", min_value=params.min_images_per_class),
            "collect more images or lower validate.min_images_per_class",
        ),
        Check(
            "class_balance",
            "classes",
            gxe.ExpectColumnMaxToBeBetween(column="count_over_smallest", max_value=params.max_class_imbalance),
            "largest/smallest class count ratio; rebalance or raise validate.max_class_imbalance",
        ),
        Check("width_in_range", "manifest", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_width, max_value=params.max_width)),
        Check("height_in_range", "manifest", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_height, max_value=params.max_height)),
        Check("pixels_in_range", "manifest", gxe.ExpectColumnValuesToBeBetween(column="pixels", max_value=params.max_pixels)),
        Check("mode_allowed", "manifest", gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(params.allowed_modes))),
        Check("sha256_unique", "manifest", gxe.ExpectColumnValuesToBeUnique(column="sha256"), "exact duplicate files"),
        Check(
            "sha256_one_label",
            "manifest",
            gxe.ExpectColumnValuesToBeBetween(column="sha256_labels", max_value=1),
            "label conflict: the same image (sha256) carries different labels, e.g. in data.source and in a correction "
            "(data.reviewed_dir) or another of data.sources; keep the right one and remove the other",
        ),
        Check("phash_well_formed", "manifest", gxe.ExpectColumnValuesToMatchRegex(column="phash", regex=PHASH_PATTERN)),
        Check(
            "no_near_duplicates",
            "manifest",
            near_dup,
            f"images within phash distance {params.near_duplicate_distance} of a different file",
        ),
        *[
            Check(
                f"metadata_not_null:{column}",
                "required_rows",
                gxe.ExpectColumnValuesToNotBeNull(column=column),
                f"every image needs a {column!r} value in the source's metadata (validate.required_metadata)",
            )
            for column in metadata_present
        ],
        *[
            Check(
                f"metadata_missing_in_other_sources:{column}",
                "other_rows",
                warning(gxe.ExpectColumnValuesToNotBeNull(column=column)),
                f"rows of data.sources or corrections (data.reviewed_dir) without {column!r}: they are kept, but slices and "
                "groups cannot use them; send the request context with /v1/feedback, or fill the reviewed metadata.csv",
            )
            for column in metadata_wished
        ],
        Check(
            "params_match_data",
            "params",
            gxe.ExpectColumnValuesToBeInSet(column="present", value_set=[True]),
            "params.yaml names a column or label the data does not have: fix the name, or set the setting to auto",
        ),
        *([] if split is None else [split_class_size_check(split)]),
        Check(
            "not_blank",
            "manifest",
            # a stray blank frame is reported; the gate fails when more than max_bad_fraction of the images are blank
            gxe.ExpectColumnValuesToBeBetween(
                column="contrast", min_value=params.min_contrast, mostly=max(1.0 - params.max_bad_fraction, 1e-9)
            ),
            f"flat images (grey-level std < {params.min_contrast:g}) carry nothing to learn; remove them or lower "
            f"validate.min_contrast (the gate fails above validate.max_bad_fraction={params.max_bad_fraction:g} of them)",
        ),
        Check("brightness_in_range", "manifest", gxe.ExpectColumnValuesToBeBetween(column="brightness", min_value=lo, max_value=hi)),
        Check("sharpness_min", "manifest", gxe.ExpectColumnValuesToBeBetween(column="sharpness", min_value=params.min_sharpness)),
    ]


def warning(expectation: Any) -> Any:
    expectation.severity = FailureSeverity.WARNING
    return expectation


def split_class_size_check(split: SplitParams) -> Check:
    expectation = gxe.ExpectColumnValuesToBeBetween(column="count", min_value=split.min_class_size)
    if split.on_small_class == "warn":
        expectation.severity = FailureSeverity.WARNING
    return Check(
        "split_min_class_size",
        "classes",
        expectation,
        f"the split needs at least split.min_class_size={split.min_class_size} images per class; "
        "collect more, lower it, or set split.on_small_class: warn",
    )


def params_reference_frame(resolved: Resolved, columns: Sequence[str], labels: Sequence[str]) -> pd.DataFrame:
    """One row per column or label that params name, with whether the data has it (checked by `params_match_data`)."""
    present_columns, present_labels = set(map(str, columns)), set(map(str, labels))
    rows = [("validate.required_metadata", c, c in present_columns) for c in resolved.required_metadata]
    if resolved.group_column is not None:
        rows.append(("split.group_column", resolved.group_column, resolved.group_column in present_columns))
    rows += [("evaluate.slices", c, c in present_columns) for c in resolved.slices]
    for setting, label in (("evaluate.negative_class", resolved.negative_class), ("evaluate.positive_class", resolved.positive_class)):
        if label is not None:
            rows.append((setting, label, label in present_labels))
    return pd.DataFrame(
        {
            "setting": [f"{setting}={name!r}" for setting, name, _ in rows],
            "present": pd.Series([present for _, _, present in rows], dtype=bool),
        }
    )


def leakage_checks(max_distance: int) -> list[Check]:
    hint = "the split must keep these together; re-run `lensmith split`"
    return [
        Check("path_in_one_split", "splits", gxe.ExpectColumnValuesToBeUnique(column="path"), hint),
        Check("sha256_in_one_split", "splits", gxe.ExpectColumnValuesToBeBetween(column="sha256_splits", max_value=1), hint),
        Check(
            "near_duplicate_group_in_one_split",
            "splits",
            gxe.ExpectColumnValuesToBeBetween(column="near_duplicate_splits", max_value=1),
            f"images within phash distance {max_distance} are in different splits; {hint}",
        ),
    ]


# ---------------------------------------------------------------- summaries


def near_duplicate_summary(frame: pd.DataFrame, max_distance: int) -> dict[str, Any]:
    """Groups of near-duplicate (distinct) files, images involved and example pairs with their distance."""
    involved = frame[frame["near_duplicate_distinct_images"] > 1]
    pairs = []
    for _, group in involved.groupby("near_duplicate_group", sort=True):
        first = group.iloc[0]
        other = group[group["sha256"] != first["sha256"]].iloc[0]
        pairs.append({"a": first["path"], "b": other["path"], "distance": hamming_distance(first["phash"], other["phash"])})
        if len(pairs) >= MAX_EXAMPLES:
            break
    return {
        "max_distance": max_distance,
        "groups": int(involved["near_duplicate_group"].nunique()),
        "images": len(involved),
        "example_pairs": pairs,
    }


def leak_examples(frame: pd.DataFrame, group_column: str, count_column: str) -> list[dict[str, Any]]:
    """Up to MAX_EXAMPLES leaking groups, each as its split -> paths."""
    leaking = frame[frame[count_column] > 1]
    examples = []
    for key, group in leaking.groupby(group_column, sort=True):
        splits = {split: sorted(rows["path"].astype(str))[:5] for split, rows in group.groupby("split", sort=True)}
        examples.append({group_column: str(key), "splits": ", ".join(splits), "paths": "; ".join(f"{s}: {', '.join(p)}" for s, p in splits.items())})
        if len(examples) >= MAX_EXAMPLES:
            break
    return examples


# ---------------------------------------------------------------- entry points


def fail_before_checks(layout: Layout, name: str, problem: str, fix: str, rows: int = 0) -> GateFailedError:
    """Write the data gate's reports with one failed check (problem + fix); return the error to raise."""
    result = write_precondition_report(layout.validation_json, layout.validation_html, precondition_failure(name, problem, fix), rows)
    return GateFailedError(gate_failure_message(result))


def read_manifest_for_validation(layout: Layout) -> pd.DataFrame:
    """The manifest, or a failed report naming why it cannot be validated."""
    try:
        manifest = read_table(layout.manifest, MANIFEST_COLUMNS, "manifest")
    except DataError as exc:
        raise fail_before_checks(layout, "manifest_readable", str(exc), "run `lensmith ingest` (or `lensmith run`) first") from None
    if manifest.empty:
        raise fail_before_checks(
            layout,
            "images_present",
            f"manifest {layout.manifest} has no rows: the source holds no usable images",
            "point data.source at an image folder (<class>/<file>), a CSV manifest or an s3:// prefix with images",
        )
    return manifest


def run_validate(params: Params, layout: Layout) -> ValidationResult:
    """Validate data/manifest.parquet; write reports/validation.{json,html}; raise GateFailedError if it fails."""
    vp = params.validate
    manifest = read_manifest_for_validation(layout)
    try:
        labels, label_source = expected_labels(vp, layout, manifest["label"].astype(str).unique().tolist())
    except DataError as exc:
        raise fail_before_checks(layout, "label_lock_readable", str(exc), f"delete {layout.labels_lock.name} to re-pin", len(manifest)) from None
    resolved = resolve(params, manifest, labels)
    frame = with_derived_columns(manifest, vp.near_duplicate_distance)
    classes = class_count_frame(frame["label"], labels)
    references = params_reference_frame(resolved, list(manifest.columns), labels)
    present = [c for c in resolved.required_metadata if c in manifest.columns]
    required_rows = rows_of_data_source(params, frame) if vp.required_metadata == AUTO else pd.Series(True, index=frame.index)
    other_rows = frame[~required_rows]
    checks = gxrun.run_checks(
        [
            Frame("manifest", frame, "path"), Frame("required_rows", frame[required_rows], "path"),
            Frame("other_rows", other_rows, "path"), Frame("classes", classes, "label"), Frame("params", references, "setting"),
        ],
        manifest_checks(vp, labels, label_source, present, params.split, present if len(other_rows) else ()),
    )
    result = ValidationResult(
        title="data validation",
        checks=checks,
        rows=len(frame),
        json_path=layout.validation_json,
        html_path=layout.validation_html,
        class_counts={str(r.label): int(r.count) for r in classes.itertuples()},
        sections={
            "labels": {"expected": labels, "source": label_source},
            "resolved": resolved.as_dict(),
            "near_duplicates": near_duplicate_summary(frame, vp.near_duplicate_distance),
        },
        notes=["settings resolved from the data:", *(f"  {line}" for line in resolved.lines())],
    )
    return finish(result)


def leakage_report_paths(layout: Layout) -> tuple[Path, Path]:
    return layout.reports / "leakage.json", layout.reports / "leakage.html"


def read_splits(layout: Layout) -> pd.DataFrame:
    """All split files stacked, with a `split` column."""
    parts = []
    for name in SPLIT_NAMES:
        part = read_table(layout.split_file(name), SPLIT_COLUMNS, f"{name} split")
        parts.append(part.assign(split=name))
    return pd.concat(parts, ignore_index=True)


def leakage_frame(splits: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Per row: in how many splits its sha256 and its near-duplicate group appear."""
    frame = splits.copy()
    frame["sha256_splits"] = frame.groupby("sha256")["split"].transform("nunique")
    frame["near_duplicate_group"] = near_duplicate_groups(valid_phashes(frame["phash"]), max_distance)
    frame["near_duplicate_splits"] = frame.groupby("near_duplicate_group")["split"].transform("nunique")
    return frame


def check_split_leakage(params: Params, layout: Layout) -> ValidationResult:
    """No file (sha256) or near-duplicate group in more than one split; reports/leakage.{json,html}; raises on leakage."""
    distance = params.validate.near_duplicate_distance
    frame = leakage_frame(read_splits(layout), distance)
    json_path, html_path = leakage_report_paths(layout)
    result = ValidationResult(
        title="split leakage",
        checks=gxrun.run_checks([Frame("splits", frame, "path")], leakage_checks(distance)),
        rows=len(frame),
        json_path=json_path,
        html_path=html_path,
        class_counts={},
        sections={
            "split_sizes": {name: int(n) for name, n in frame["split"].value_counts().reindex(SPLIT_NAMES, fill_value=0).items()},
            "leaks": {
                "max_distance": distance,
                "exact_duplicates": leak_examples(frame, "sha256", "sha256_splits"),
                "near_duplicates": leak_examples(frame, "near_duplicate_group", "near_duplicate_splits"),
            },
        },
    )
    return finish(result)


def finish(result: ValidationResult) -> ValidationResult:
    """Write both reports, then fail the gate if a blocking check failed."""
    write_reports(result)
    if not result.success:
        raise GateFailedError(gate_failure_message(result))
    return result
