"""Split leakage: no file (sha256) and no near-duplicate group may sit in more than one split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lensmith.errors import DataError, GateFailedError
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.validate import check_split_leakage, leakage_report_paths

SIZES = {"train": 28, "val": 6, "test": 6}


def clean_splits() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(3)
    splits, start = {}, 0
    for name, size in SIZES.items():
        ids = range(start, start + size)
        splits[name] = pd.DataFrame(
            {
                "path": [f"img/{i:03d}.png" for i in ids],
                "label": "ok",
                "sha256": [f"{i:064x}" for i in ids],
                # Random 64-bit hashes are ~32 bits apart: no accidental near-duplicates.
                "phash": [f"{int(v):016x}" for v in rng.integers(0, 2**63, size, dtype=np.int64)],
            }
        )
        start += size
    return splits


def write_splits(root: Path, splits: dict[str, pd.DataFrame]) -> Layout:
    layout = Layout(root)
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_parquet(layout.split_file(name), index=False)
    return layout


def leakage_report(tmp_path: Path, splits: dict[str, pd.DataFrame], distance: int = 4) -> tuple[str, dict[str, Any]]:
    """(gate error message, leakage.json) of a run that must fail."""
    layout = write_splits(tmp_path, splits)
    with pytest.raises(GateFailedError) as caught:
        check_split_leakage(_params(distance), layout)
    return str(caught.value), json.loads(leakage_report_paths(layout)[0].read_text())


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_clean_split_passes_and_writes_both_reports(tmp_path: Path) -> None:
    layout = write_splits(tmp_path, clean_splits())
    result = check_split_leakage(Params(), layout)
    assert result.success and all(c.success for c in result.checks)
    json_path, html_path = leakage_report_paths(layout)
    report = json.loads(json_path.read_text())
    assert report["success"] is True
    assert report["split_sizes"] == SIZES
    assert report["statistics"]["failed"] == 0
    html = html_path.read_text()
    assert "PASSED" in html and 'src="http' not in html and 'href="http' not in html


def test_exact_duplicate_across_splits_fails_with_its_paths(tmp_path: Path) -> None:
    splits = clean_splits()
    splits["test"].loc[2, ["sha256", "phash"]] = splits["train"].loc[5, ["sha256", "phash"]].to_numpy()
    message, report = leakage_report(tmp_path, splits)
    leak = check(report, "sha256_in_one_split")
    assert leak["success"] is False
    assert sorted(leak["examples"]) == sorted([splits["train"].loc[5, "path"], splits["test"].loc[2, "path"]])
    assert "sha256_in_one_split" in message and splits["train"].loc[5, "path"] in message
    assert report["leaks"]["exact_duplicates"][0]["splits"] == "test, train"


def test_near_duplicate_across_splits_fails(tmp_path: Path) -> None:
    splits = clean_splits()
    near = int(splits["train"].loc[1, "phash"], 16) ^ 0b1001  # 2 bits away, a different file
    splits["val"].loc[0, "phash"] = f"{near:016x}"
    message, report = leakage_report(tmp_path, splits, distance=4)
    leak = check(report, "near_duplicate_group_in_one_split")
    assert sorted(leak["examples"]) == sorted([splits["train"].loc[1, "path"], splits["val"].loc[0, "path"]])
    assert check(report, "sha256_in_one_split")["success"] is True
    assert "near_duplicate_group_in_one_split" in message

    # With a threshold below their distance they are not near-duplicates: no leak.
    assert check_split_leakage(_params(distance=1), Layout(tmp_path)).success


def test_near_duplicates_within_one_split_are_not_leakage(tmp_path: Path) -> None:
    splits = clean_splits()
    splits["train"].loc[3, "phash"] = splits["train"].loc[4, "phash"]
    assert check_split_leakage(Params(), write_splits(tmp_path, splits)).success


def test_same_path_in_two_splits_fails(tmp_path: Path) -> None:
    splits = clean_splits()
    splits["val"].loc[1, "path"] = splits["train"].loc[0, "path"]
    _, report = leakage_report(tmp_path, splits)
    assert check(report, "path_in_one_split")["examples"] == [splits["train"].loc[0, "path"]] * 2


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    splits = clean_splits()
    del splits["val"]
    layout = write_splits(tmp_path, splits)
    with pytest.raises(DataError, match="val split not found"):
        check_split_leakage(Params(), layout)


def _params(distance: int) -> Params:
    params = Params()
    params.validate.near_duplicate_distance = distance
    return params
