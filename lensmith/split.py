"""The split stage: stratified, group-aware, stable train/val/test assignment (`lensmith split`).

Groups. Images that must never straddle splits are merged into one group (union-find):
  - images sharing a value of `split.group_column` (e.g. the production `batch`);
  - exact duplicates (same `sha256`);
  - near-duplicates (perceptual-hash Hamming distance <= `validate.near_duplicate_distance`,
    transitively; see lensmith.neardup).
With `group_column: null` each image starts as its own group, and duplicates are still merged.
A group's key (the `group` column) is its smallest member key (`<group_column>=<value>` or
`path=<path>`).

Assignment, stable under growth. Pure hash-of-group assignment is stable but misses the target
fractions by binomial noise (about 5 points with 50 groups per class), so instead:
  1. If split files from a previous run exist in data/splits, every image already there (key:
     `path`) keeps its split, and so does every group with a member there: its new images join
     that split. A group bridging several existing splits (e.g. a new image that is a near-copy
     of images in train and in test) keeps the existing assignments; its new images go to the
     split holding most of its existing members, and the summary records a warning.
  2. Only entirely new groups are assigned, one at a time, in a deterministic order (largest
     group first, ties in hash order of (split.seed, group key)), each to the split with the
     largest relative deficit against the target fractions for the classes it holds
     (count-weighted over the group's labels) among the splits with room for the whole group;
     when none has room, to the split with the largest absolute deficit. Targets are fractions of
     each class's total count (old + new images), so a new run also evens out past drift.
So adding images never moves an existing image, and each class ends within about one small
group of its target fractions (measured: <= 1 point for 50 images/class in groups of 1-3, and
for 500 images/class in groups of 5-10).

This needs the previous outputs to survive a re-run: the DVC stage declares `data/splits` with
`persist: true` (DVC would otherwise delete outputs before running the stage). Changed fractions
or group column apply to new groups only; delete data/splits to re-split from scratch.

Classes with fewer than `split.min_class_size` images cannot be split: `on_small_class: error`
raises DataError naming them; `warn` puts their (new) groups in train and records a warning.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lensmith.errors import DataError
from lensmith.fsutil import atomic_path
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.neardup import connected_groups, near_duplicate_groups
from lensmith.params import Params, SplitParams

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label")


@dataclass
class SplitSummary:
    counts: dict[str, dict[str, int]]  # label -> split -> images
    targets: dict[str, float]  # split -> target fraction
    n_groups: int
    n_kept: int  # images that kept the split they had in the previous run
    n_new: int
    n_dropped: int  # images of the previous split files no longer in the manifest
    warnings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def split_counts(self) -> dict[str, int]:
        return {name: sum(per_split[name] for per_split in self.counts.values()) for name in self.targets}

    @property
    def n_images(self) -> int:
        return sum(self.split_counts.values())

    def fractions(self) -> dict[str, dict[str, float]]:
        """label (and "all") -> split -> share of that label's images."""
        rows = {**self.counts, "all": self.split_counts}
        return {label: {s: n / max(sum(per.values()), 1) for s, n in per.items()} for label, per in rows.items()}

    def to_dict(self) -> dict[str, object]:
        return {
            "n_images": self.n_images,
            "n_groups": self.n_groups,
            "n_kept": self.n_kept,
            "n_new": self.n_new,
            "n_dropped": self.n_dropped,
            "targets": self.targets,
            "counts": self.counts,
            "split_counts": self.split_counts,
            "fractions": self.fractions(),
            "warnings": self.warnings,
            "files": {name: str(path) for name, path in self.files.items()},
        }

    def __str__(self) -> str:
        names = list(self.targets)
        width = max([len(label) for label in self.counts] + [5])
        header = f"{'class':<{width}}  " + "  ".join(f"{f'{n} ({self.targets[n]:.0%})':>14}" for n in names)
        lines = [
            f"split: {self.n_images} images in {self.n_groups} groups "
            f"({self.n_kept} kept from the previous split, {self.n_new} newly assigned, {self.n_dropped} dropped)",
            header,
        ]
        fractions = self.fractions()
        for label, per_split in [*self.counts.items(), ("all", self.split_counts)]:
            cells = "  ".join(f"{per_split[n]:>6} {fractions[label][n]:>6.1%}  " for n in names)
            lines.append(f"{label:<{width}}  {cells}")
        lines.extend(f"warning: {text}" for text in self.warnings)
        return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"no manifest at {path}: run `lensmith ingest` first")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure is a bad input file
        raise DataError(f"cannot read the manifest {path}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"manifest {path} lacks column(s) {', '.join(missing)}; it has: {', '.join(frame.columns)}")
    if frame.empty:
        raise DataError(f"manifest {path} has no images: nothing to split (check data.source and data/quarantine.csv)")
    if frame["path"].duplicated().any():
        dupes = frame.loc[frame["path"].duplicated(), "path"].head(5).tolist()
        raise DataError(f"manifest {path} lists some paths twice, e.g. {dupes}")
    return frame.reset_index(drop=True)


def read_previous_assignments(layout: Layout) -> pd.Series:
    """path -> split name from existing data/splits/*.parquet (empty when there is no previous split)."""
    parts = []
    for name in SPLIT_NAMES:
        file = layout.split_file(name)
        if not file.exists():
            continue
        try:
            paths = pd.read_parquet(file, columns=["path"])["path"]
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"cannot read the previous split file {file}: {exc}; delete it to re-split from scratch"
            ) from None
        parts.append(pd.Series(name, index=paths.astype(str).to_numpy()))
    if not parts:
        return pd.Series(dtype=object)
    previous = pd.concat(parts)
    return previous[~previous.index.duplicated(keep="first")]


# ---------------------------------------------------------------- groups


def first_member_edges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row to the first row with the same code (codes < 0: no edge)."""
    rows = np.flatnonzero(codes >= 0)
    if not rows.size:
        return rows, rows
    _, first, inverse = np.unique(codes[rows], return_index=True, return_inverse=True)
    return rows, rows[first][inverse]


def member_keys(frame: pd.DataFrame, group_column: str | None) -> pd.Series:
    """`<column>=<value>` for rows with a group value, else `path=<path>`."""
    keys = "path=" + frame["path"].astype(str)
    if group_column is not None:
        values = frame[group_column]
        has_value = values.notna()
        keys = keys.where(~has_value, f"{group_column}=" + values.astype(str))
    return keys


def group_keys(frame: pd.DataFrame, group_column: str | None, near_duplicate_distance: int) -> pd.Series:
    """Group key per row: union of group-column groups, exact duplicates and near-duplicates."""
    if group_column is not None and group_column not in frame.columns:
        raise DataError(
            f"split.group_column {group_column!r} is not a manifest column; "
            f"available: {', '.join(map(str, frame.columns))} "
            "(or set split.group_column: null to group only duplicates)"
        )
    keys = member_keys(frame, group_column)
    labellings = [pd.factorize(keys)[0]]
    if "sha256" in frame.columns:
        labellings.append(pd.factorize(frame["sha256"], use_na_sentinel=True)[0])
    if "phash" in frame.columns:
        labellings.append(near_duplicate_groups(frame["phash"].tolist(), near_duplicate_distance))
    edges = [first_member_edges(np.asarray(codes)) for codes in labellings]
    left = np.concatenate([edge[0] for edge in edges])
    right = np.concatenate([edge[1] for edge in edges])
    component = connected_groups(len(frame), left, right)
    return smallest_key_per_component(keys, component)


def smallest_key_per_component(keys: pd.Series, component: np.ndarray) -> pd.Series:
    table = pd.DataFrame({"component": component, "key": keys.to_numpy()})
    smallest = table.sort_values(["component", "key"]).drop_duplicates("component").set_index("component")["key"]
    return pd.Series(smallest.reindex(component).to_numpy(), index=keys.index)


# ---------------------------------------------------------------- assignment


def group_order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def small_classes(labels: pd.Series, min_class_size: int) -> dict[str, int]:
    counts = labels.value_counts()
    return {str(label): int(n) for label, n in counts.items() if n < min_class_size}


def check_small_classes(labels: pd.Series, params: SplitParams) -> tuple[set[str], list[str]]:
    """Classes forced into train, and warnings; raises DataError when on_small_class is error."""
    small = small_classes(labels, params.min_class_size)
    if not small:
        return set(), []
    listing = ", ".join(f"{label!r} ({n} images)" for label, n in sorted(small.items()))
    if params.on_small_class == "error":
        raise DataError(
            f"class(es) too small to split into train/val/test: {listing}; split.min_class_size is "
            f"{params.min_class_size}. Add images, remove the class, or set split.on_small_class: warn "
            "to put all of its images in train."
        )
    return set(small), [f"class(es) below split.min_class_size={params.min_class_size}, all in train: {listing}"]


@dataclass
class GroupTable:
    """Rows of each group (contiguous slices of `order`) and each group's class composition."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    names: pd.Index

    def rows(self, code: int) -> np.ndarray:
        return self.order[self.starts[code] : self.starts[code] + self.sizes[code]]


def group_table(groups: pd.Series) -> tuple[np.ndarray, GroupTable]:
    codes, names = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return codes, GroupTable(order=order, starts=starts, sizes=sizes, names=names)


def choose_split(deficits: np.ndarray, targets: np.ndarray, size: int, usable: np.ndarray) -> int:
    """Split for a group of `size` images, given each split's deficit/target for the group's classes.

    Prefer the largest relative deficit among splits with room for at least half the group (this
    spreads groups in proportion); when none has room, the largest absolute deficit (least overshoot).
    """
    relative = np.where(usable, deficits / np.maximum(targets, 1e-9), -np.inf)
    room = usable & (deficits >= size - 1e-9)
    if room.any():
        return int(np.argmax(np.where(room, relative, -np.inf)))
    return int(np.argmax(np.where(usable, deficits, -np.inf)))


def assign_splits(
    labels: pd.Series, groups: pd.Series, previous: pd.Series, params: SplitParams
) -> tuple[np.ndarray, list[str]]:
    """Split index (into SPLIT_NAMES) per row, and warnings. `previous`: split name per row or NaN.

    See the module docstring for the rules. New groups are visited largest first (ties in hash
    order), so the small ones come last and fill what is left: that is what keeps every class
    within a few images of its target fractions.
    """
    forced_train, warnings = check_small_classes(labels, params)
    fractions = np.array([getattr(params, name) for name in SPLIT_NAMES], dtype=float)
    label_codes, classes = pd.factorize(labels, sort=True)
    _, table = group_table(groups)
    n_splits, n_classes = len(SPLIT_NAMES), len(classes)

    assigned = previous.map({name: i for i, name in enumerate(SPLIT_NAMES)}).fillna(-1).to_numpy(dtype=np.int64)
    totals = np.bincount(label_codes, minlength=n_classes).astype(float)
    targets = fractions[:, None] * totals[None, :]
    counts = np.zeros((n_splits, n_classes))
    np.add.at(counts, (assigned[assigned >= 0], label_codes[assigned >= 0]), 1)

    sorted_assigned = assigned[table.order]
    has_old = np.maximum.reduceat(sorted_assigned, table.starts) >= 0
    has_new = np.minimum.reduceat(sorted_assigned, table.starts) < 0
    for code in np.flatnonzero(has_old & has_new):
        rows = table.rows(code)
        fresh = rows[assigned[rows] < 0]
        held = np.bincount(assigned[rows][assigned[rows] >= 0], minlength=n_splits)
        target_split = int(np.argmax(held))
        if (held > 0).sum() > 1:
            warnings.append(
                f"group {table.names[code]!r} already spans {', '.join(SPLIT_NAMES[i] for i in np.flatnonzero(held))}; "
                f"kept them and put its {fresh.size} new image(s) in {SPLIT_NAMES[target_split]}"
            )
        assigned[fresh] = target_split
        np.add.at(counts, (target_split, label_codes[fresh]), 1)

    usable = fractions > 0
    small_codes = np.array([str(label) in forced_train for label in classes])
    new_groups = np.flatnonzero(~has_old)
    hashes = [group_order_key(params.seed, str(table.names[code])) for code in new_groups]
    for position in np.lexsort((hashes, -table.sizes[new_groups])):
        code = new_groups[position]
        rows = table.rows(code)
        composition = np.bincount(label_codes[rows], minlength=n_classes)
        if small_codes[composition > 0].any():
            choice = 0
        else:
            choice = choose_split((targets - counts) @ composition / rows.size, targets @ composition / rows.size,
                                  rows.size, usable)
        assigned[rows] = choice
        counts[choice] += composition
    return assigned, warnings


# ---------------------------------------------------------------- outputs


def split_frames(manifest: pd.DataFrame, assigned: np.ndarray, groups: pd.Series) -> dict[str, pd.DataFrame]:
    frame = manifest.assign(split=np.asarray(SPLIT_NAMES, dtype=object)[assigned], group=groups.to_numpy())
    return {
        name: frame[frame["split"] == name].sort_values("path", kind="stable").reset_index(drop=True)
        for name in SPLIT_NAMES
    }


def write_split_files(layout: Layout, frames: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write all split files; none is replaced unless all were written."""
    targets = {name: layout.split_file(name) for name in frames}
    with ExitStack() as stack:
        temps = {name: stack.enter_context(atomic_path(target, suffix=".parquet")) for name, target in targets.items()}
        for name, frame in frames.items():
            frame.to_parquet(temps[name], index=False)
    return targets


def summarise(
    frames: dict[str, pd.DataFrame], params: SplitParams, groups: pd.Series, previous: pd.Series, warnings: list[str]
) -> SplitSummary:
    labels = sorted({str(label) for frame in frames.values() for label in frame["label"]})
    counts = {
        label: {name: int((frame["label"].astype(str) == label).sum()) for name, frame in frames.items()}
        for label in labels
    }
    current_paths = pd.Index(pd.concat([f["path"] for f in frames.values()]).astype(str))
    n_kept = int(current_paths.isin(previous.index).sum())
    return SplitSummary(
        counts=counts,
        targets={name: float(getattr(params, name)) for name in SPLIT_NAMES},
        n_groups=int(groups.nunique()),
        n_kept=n_kept,
        n_new=len(current_paths) - n_kept,
        n_dropped=int((~previous.index.isin(current_paths)).sum()),
        warnings=warnings,
    )


def split_manifest(
    manifest: pd.DataFrame, params: Params, previous: pd.Series | None = None
) -> tuple[dict[str, pd.DataFrame], SplitSummary]:
    """In-memory split: the three frames (manifest columns + split + group) and the summary."""
    previous = previous if previous is not None else pd.Series(dtype=object)
    from lensmith.resolve import resolve

    group_column = resolve(params, manifest, manifest["label"].astype(str).unique().tolist()).group_column
    groups = group_keys(manifest, group_column, params.validate.near_duplicate_distance)
    previous_per_row = manifest["path"].astype(str).map(previous)
    assigned, warnings = assign_splits(manifest["label"].astype(str), groups, previous_per_row, params.split)
    frames = split_frames(manifest, assigned, groups)
    return frames, summarise(frames, params.split, groups, previous, warnings)


def run_split(params: Params, layout: Layout) -> SplitSummary:
    """Split data/manifest.parquet into data/splits/{train,val,test}.parquet (stable; see module doc)."""
    manifest = read_manifest(layout.manifest)
    frames, summary = split_manifest(manifest, params, read_previous_assignments(layout))
    summary.files = write_split_files(layout, frames)
    return summary


def read_split_frame(layout: Layout, name: str, columns: tuple[str, ...] = ("file", "label"), needed_for: str = "") -> pd.DataFrame:
    """One written split (train/val/test) for a downstream stage. A clear DataError, naming the file and
    `lensmith split`, when it is missing, unreadable, lacks `columns` or is empty."""
    path = layout.split_file(name)
    if not path.is_file():
        raise DataError(f"the {name} split {path} is missing; run `lensmith split` first")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parquet/arrow failure means the same thing here
        raise DataError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc}); rerun `lensmith split`") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; rerun `lensmith split`")
    if frame.empty:
        raise DataError(f"the {name} split {path} is empty{': ' + needed_for if needed_for else ''}; check split.* and the data")
    return frame.reset_index(drop=True)
