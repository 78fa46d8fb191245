"""`lensmith review import` (#16): a corrected label is one safe folder name; nothing escapes the data folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import DataError
from lensmith.serve.review import import_corrections, label_problem, read_corrections
from test_review import project, queue_items  # noqa: F401 - the fixture

BAD_LABELS = ["../../x", "/etc/x", "a/b", "..", ".hidden", "a\\b", "a\x00b", "a\nb", "x" * 129, "a..b"]


@pytest.mark.parametrize("label", BAD_LABELS)
def test_unsafe_labels_are_named_as_such(label: str) -> None:
    assert label_problem(label) is not None


@pytest.mark.parametrize("label", ["crack", "ok", "scratch", "new-defect_2", "Riß", "x" * 128])
def test_ordinary_labels_pass(label: str) -> None:
    assert label_problem(label) is None


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "corrected_label"])
        writer.writerows(rows)
    return path


def data_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("label", ["../../x", "/etc/x", "a/b", ".."])
def test_a_path_label_in_the_csv_stops_the_import_naming_the_row(project: Path, label: str) -> None:  # noqa: F811
    ids = queue_items(project)
    before = data_files(project.parent)
    corrections = write_csv(project / "fixed.csv", [(ids["b_feedback"], "crack"), (ids["a_low"], label)])
    with pytest.raises(DataError, match=r"line 3 \(item .*\).*cannot be used as a folder name") as info:
        read_corrections(corrections)
    assert repr(label) in str(info.value)
    result = CliRunner().invoke(
        app, ["review", "import", str(corrections), "--allow-new-labels", "--root", str(project), "--params", str(project / "params.yaml")]
    )
    assert result.exit_code != 0 and "line 3" in result.output and "Traceback" not in result.output
    assert data_files(project.parent) == before | {"proj/fixed.csv"}  # nothing written anywhere, not even the good row


def test_a_path_label_in_a_labelstudio_export_names_the_task(project: Path) -> None:  # noqa: F811
    ids = queue_items(project)
    export = [{"data": {"item_id": ids["a_low"]}, "annotations": [{"result": [{"value": {"choices": ["../../x"]}}]}]}]
    path = project / "ls.json"
    path.write_text(json.dumps(export))
    with pytest.raises(DataError, match=r"task 1 \(item .*\).*'\.\./\.\./x'"):
        read_corrections(path)


@pytest.mark.parametrize("label", ["../../x", "/etc/x", "a/b", ".."])
def test_import_refuses_unsafe_labels_even_with_new_labels_allowed(project: Path, label: str) -> None:  # noqa: F811
    ids = queue_items(project)
    source = project / "data" / "raw" / "demo"
    before = data_files(project.parent)
    with pytest.raises(DataError, match=f"item {ids['a_low']}"):
        import_corrections(project / "serving" / "review", {ids["a_low"]: [label]}, source, ["crack"], allow_new_labels=True)
    assert data_files(project.parent) == before


def test_a_label_folder_symlinked_out_of_the_data_is_a_conflict(project: Path, tmp_path: Path) -> None:  # noqa: F811
    ids = queue_items(project)
    source = project / "data" / "raw" / "demo"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (source / "dent").symlink_to(outside, target_is_directory=True)
    report = import_corrections(project / "serving" / "review", {ids["b_feedback"]: ["dent"]}, source, ["dent"])
    assert [c["reason"] for c in report.conflicts] == ["outside_folder"] and not report.imported
    assert list(outside.rglob("*")) == []
