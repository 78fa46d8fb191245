"""The reviewed-data folder (`data.reviewed_dir`): human corrections as a versioned source of their own.

    <reviewed_dir>/README.md         what this folder is (ingest reads images only)
    <reviewed_dir>/metadata.csv      one row per image: `path` (<label>/<file>, as ingest's metadata.csv), the
                                     request context the service recorded, and provenance (REVIEW_COLUMNS)
    <reviewed_dir>/<label>/<sha256>.<ext>   the corrected images, content-addressed
    <reviewed_dir>/<label>.dvc, .gitignore   written by `dvc add <reviewed_dir>/<label>` after each import

Versioning: the folder always exists in git (README.md and metadata.csv, header only at first), so the ingest
stage can declare it as a DVC dep; the images of each label folder are tracked by DVC (`<label>.dvc`), so the
nightly's `dvc push` sends them to the remote and its commit records the pointers (`git_tracked_paths`).
A whole git-tracked folder cannot later be `dvc add`ed, hence one DVC target per label folder.

Nothing but `lensmith review import` writes here, and no stage: the folder must not lie inside data.source or
any stage's output (`location_problem`), or a rerun of that stage would delete the work.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from lensmith.fsutil import atomic_path, write_text_atomic
from lensmith.schema import REVIEW_COLUMNS

METADATA_FILE = "metadata.csv"
README_FILE = "README.md"
README_TEXT = """# Reviewed images (human corrections)

Written by `lensmith review import` only: `<label>/<sha256>.<ext>` plus one row per image in metadata.csv
(the request context and who/what/when of the correction). Ingest reads this folder as a source beside
`data.source`. The images of each label folder are versioned by DVC (`<label>.dvc`); metadata.csv by git.
Do not edit by hand; to drop a correction, remove its file and its metadata.csv row together.
"""


def ensure_reviewed_folder(folder: Path) -> None:
    """Create the folder with its README and a header-only metadata.csv when they are missing (never rewrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / README_FILE).exists():
        write_text_atomic(folder / README_FILE, README_TEXT)
    if not (folder / METADATA_FILE).exists():
        write_metadata_rows(folder, [], ["path", *REVIEW_COLUMNS])


def location_problem(folder: Path, forbidden: Mapping[str, Path]) -> str | None:
    """Why `folder` cannot hold corrections (it lies inside, or contains, one of `forbidden`: what -> folder), or None."""
    here = folder.resolve()
    for what, other in forbidden.items():
        there = Path(other).resolve()
        if here.is_relative_to(there) or there.is_relative_to(here):
            return (
                f"data.reviewed_dir {folder} overlaps {what} ({other}): a rerun would delete or re-read the corrections; "
                "point data.reviewed_dir at a folder of its own (default data/reviewed)"
            )
    return None


def read_metadata_rows(folder: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of the folder's metadata.csv, as text; ([], []) when there is none."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), [dict(row) for row in reader]


def metadata_columns_for(existing: list[str], rows: Iterable[Mapping[str, str]]) -> list[str]:
    """`path`, then context columns (existing order, new ones sorted after), then REVIEW_COLUMNS."""
    fixed = {"path", *REVIEW_COLUMNS}
    context = [c for c in existing if c not in fixed]
    new = sorted({c for row in rows for c in row if c not in fixed and c not in context})
    return ["path", *context, *new, *REVIEW_COLUMNS]


def write_metadata_rows(folder: Path, rows: list[Mapping[str, str]], columns: list[str]) -> None:
    """Replace metadata.csv atomically (temp file + rename): readers see the old rows or all the new ones."""
    with atomic_path(folder / METADATA_FILE, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def append_metadata_rows(folder: Path, new_rows: list[Mapping[str, str]]) -> None:
    """metadata.csv with its existing rows kept and `new_rows` added (an existing path keeps its first row)."""
    columns, rows = read_metadata_rows(folder)
    known = {row.get("path") for row in rows}
    rows += [row for row in new_rows if row.get("path") not in known]
    write_metadata_rows(folder, rows, metadata_columns_for(columns, rows))


def labels_in_folder(folder: Path) -> dict[str, set[str]]:
    """sha256 -> labels of the images in the folder (`<label>/<sha256>.<ext>`)."""
    labels: dict[str, set[str]] = defaultdict(set)
    if folder.is_dir():
        for path in folder.glob("*/*"):
            if path.is_file() and not path.name.startswith("."):
                labels[path.stem].add(path.parent.name)
    return dict(labels)


def git_tracked_paths(root: Path, folder: Path) -> list[str]:
    """What git versions of the folder, relative to `root`: README, metadata.csv, the DVC pointers and .gitignore."""
    if not folder.is_dir() or not folder.resolve().is_relative_to(root.resolve()):
        return []
    names = [README_FILE, METADATA_FILE, ".gitignore", *sorted(p.name for p in folder.glob("*.dvc"))]
    relative = folder.resolve().relative_to(root.resolve())
    return [(relative / name).as_posix() for name in names if (folder / name).exists()]
