"""The data gate: each check fails on a crafted bad manifest and passes on a good one; reports, pinning, CLI, offline."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import GateFailedError
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.validate import ValidationResult, run_validate

LABELS = ["crack", "ok", "scratch", "stain"]
PER_CLASS = 30
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connection or DNS lookup to a non-loopback address is recorded and refused."""
    attempts: list[Any] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test forbids network access to {address}")
        return real_connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise OSError(f"test forbids DNS lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def random_phashes(n: int, seed: int) -> list[str]:
    # Random 64-bit hashes are ~32 bits apart: no accidental near-duplicates at distance 4.
    return [f"{int(v):016x}" for v in np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.int64)]


def good_manifest(per_class: int = PER_CLASS, labels: list[str] = LABELS) -> pd.DataFrame:
    n = per_class * len(labels)
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "path": [f"{labels[i // per_class]}/img_{i:04d}.png" for i in range(n)],
            "file": [f"img_{i:04d}.png" for i in range(n)],
            "label": np.repeat(labels, per_class),
            "sha256": [f"{i:064x}" for i in range(n)],
            "file_bytes": 4000,
            "format": "PNG",
            "width": 128,
            "height": 128,
            "mode": "RGB",
            "source_mode": "RGB",
            "channels": 3,
            "brightness": rng.uniform(60, 190, n),
            "contrast": rng.uniform(10, 60, n),
            "sharpness": rng.uniform(50, 500, n),
            "mean_r": 120.0,
            "mean_g": 120.0,
            "mean_b": 120.0,
            "phash": random_phashes(n, seed=2),
            "mtime_ns": 1,
            "site": np.where(np.arange(n) % 2, "A", "B"),
            "batch": [f"b{i % 7}" for i in range(n)],
        }
    )


def make_params(**validate: Any) -> Params:
    params = Params()
    params.validate = params.validate.model_validate({**params.validate.model_dump(), "required_metadata": ["site", "batch"], **validate})
    return params


def validate(tmp_path: Path, manifest: pd.DataFrame, **validate_params: Any) -> ValidationResult:
    layout = Layout(tmp_path)
    layout.data.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(layout.manifest, index=False)
    return run_validate(make_params(**validate_params), layout)


def failed_gate(tmp_path: Path, manifest: pd.DataFrame, **validate_params: Any) -> tuple[str, dict[str, Any]]:
    """(error message, validation.json) of a run that must fail the gate."""
    with pytest.raises(GateFailedError) as caught:
        validate(tmp_path, manifest, **validate_params)
    return str(caught.value), json.loads(Layout(tmp_path).validation_json.read_text())


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def paths_at(manifest: pd.DataFrame, rows: list[int]) -> list[str]:
    return manifest["path"].iloc[rows].tolist()


def test_good_manifest_passes_every_check_offline_without_a_gx_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_attempts: list[Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    result = validate(tmp_path / "project", good_manifest(), labels=LABELS)
    assert result.success
    assert all(c.success for c in result.checks), [c.name for c in result.checks if not c.success]
    assert result.class_counts == {label: PER_CLASS for label in LABELS}
    assert "data validation passed" in str(result)
    assert network_attempts == []
    assert not any(p.name in {"gx", "great_expectations"} for p in tmp_path.rglob("*"))


def test_network_guard_refuses_outside_connections(network_attempts: list[Any]) -> None:
    with pytest.raises(OSError, match="forbids"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    assert network_attempts


def set_rows(column: str, rows: list[int], value: Any) -> Callable[[pd.DataFrame], None]:
    def mutate(frame: pd.DataFrame) -> None:
        frame.loc[rows, column] = value

    return mutate


def copy_column(column: str, source: int, targets: list[int]) -> Callable[[pd.DataFrame], None]:
    def mutate(frame: pd.DataFrame) -> None:
        frame.loc[targets, column] = frame.loc[source, column]

    return mutate


# (check that must fail, mutation, rows it breaks). Each case breaks its own rows, so one GX run
# checks them all: every check must report exactly its rows, no more, no fewer.
ROW_CASES: list[tuple[str, Callable[[pd.DataFrame], None], list[int]]] = [
    ("path_unique", copy_column("path", 5, [9]), [5, 9]),
    ("label_in_expected_set", set_rows("label", [7, 40], "crak"), [7, 40]),
    ("width_in_range", set_rows("width", [3, 70], 6), [3, 70]),
    ("width_in_range", set_rows("width", [4], 9000), [4]),
    ("height_in_range", set_rows("height", [11], 5), [11]),
    ("pixels_in_range", set_rows("height", [12, 13], 4000), [12, 13]),
    ("pixels_in_range", set_rows("width", [12, 13], 4000), []),
    ("mode_allowed", set_rows("mode", [21], "CMYK"), [21]),
    ("sha256_unique", copy_column("sha256", 2, [100]), [2, 100]),
    ("phash_well_formed", set_rows("phash", [8], "not-a-hash"), [8]),
    ("metadata_not_null:site", set_rows("site", [15, 16], None), [15, 16]),
    ("metadata_not_null:batch", set_rows("batch", [17], None), [17]),
    ("brightness_in_range", set_rows("brightness", [30], 2.0), [30]),
    ("brightness_in_range", set_rows("brightness", [31], 254.0), [31]),
    ("sharpness_min", set_rows("sharpness", [33, 34], 1.0), [33, 34]),
    ("not_blank", set_rows("contrast", [35, 36], 0.0), [35, 36]),
    ("no_near_duplicates", copy_column("phash", 50, [51]), [50, 51]),
]
ROW_CASE_PARAMS = {
    "max_pixels": 2_000_000, "min_sharpness": 10.0, "fail_on_near_duplicates": True, "brightness_range": (5.0, 250.0),
    "max_bad_fraction": 0.0,
}


def test_each_row_check_fails_with_exactly_the_offending_paths(tmp_path: Path) -> None:
    manifest = good_manifest()
    assert validate(tmp_path, manifest, labels=LABELS, **ROW_CASE_PARAMS).success
    expected: dict[str, list[int]] = {}
    for name, mutate, rows in ROW_CASES:
        mutate(manifest)
        expected.setdefault(name, []).extend(rows)

    message, report = failed_gate(tmp_path, manifest, labels=LABELS, **ROW_CASE_PARAMS)
    assert report["success"] is False
    for name, rows in expected.items():
        failed = check(report, name)
        assert failed["success"] is False, name
        assert failed["unexpected_count"] == len(rows), name
        assert failed["example_column"] == "path"
        assert sorted(failed["examples"]) == sorted(paths_at(manifest, rows)), name
        assert name in message
    assert check(report, "mode_allowed")["unexpected_values"] == ["CMYK"]
    assert check(report, "label_in_expected_set")["unexpected_values"] == ["crak"]


def test_json_report_shape_and_offline_html(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest.loc[[3, 4], "mode"] = "P"
    failed_gate(tmp_path, manifest, labels=LABELS)
    layout = Layout(tmp_path)
    report = json.loads(layout.validation_json.read_text())
    assert report["success"] is False
    assert report["statistics"] == {"evaluated": len(report["checks"]), "successful": len(report["checks"]) - 1, "failed": 1, "warnings": 0}
    for item in report["checks"]:
        assert {
            "name", "column", "kwargs", "success", "observed_value", "unexpected_count",
            "unexpected_percent", "examples", "example_column", "expectation_type", "severity",
        } <= set(item)
        assert "batch_id" not in item["kwargs"]
    assert {"groups", "images", "example_pairs"} <= set(report["near_duplicates"])

    html = layout.validation_html.read_text()
    assert "FAILED" in html and "mode_allowed" in html
    assert manifest.loc[3, "path"] in html
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//|@import", html, re.IGNORECASE)


def test_examples_are_capped_at_twenty(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest.loc[:49, "width"] = 1
    _, report = failed_gate(tmp_path, manifest, labels=LABELS)
    width = check(report, "width_in_range")
    assert width["unexpected_count"] == 50
    assert len(width["examples"]) == 20
    assert set(width["examples"]) <= set(manifest["path"].iloc[:50])


def test_missing_expected_label_fails(tmp_path: Path) -> None:
    message, report = failed_gate(tmp_path, good_manifest(), labels=[*LABELS, "pitting"])
    present = check(report, "expected_labels_present")
    assert present["success"] is False
    assert present["example_column"] == "label"
    assert present["examples"] == ["pitting"]
    assert "validate.labels" in message


def test_too_small_class_fails(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest = manifest.drop(manifest.index[manifest["label"] == "stain"][10:])
    message, report = failed_gate(tmp_path, manifest, labels=LABELS, min_images_per_class=20)
    small = check(report, "min_images_per_class")
    assert (small["success"], small["examples"]) == (False, ["stain"])
    assert report["class_counts"]["stain"] == 10
    assert validate(tmp_path, manifest, labels=LABELS, min_images_per_class=10).success


def test_class_imbalance_bound(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest = manifest.drop(manifest.index[manifest["label"] == "ok"][10:])
    _, report = failed_gate(tmp_path, manifest, labels=LABELS, min_images_per_class=1, max_class_imbalance=2.0)
    balance = check(report, "class_balance")
    assert balance["success"] is False
    assert balance["observed_value"] == pytest.approx(PER_CLASS / 10)
    assert validate(tmp_path, manifest, labels=LABELS, min_images_per_class=1, max_class_imbalance=3.0).success


def test_near_duplicates_are_reported_but_only_fail_when_asked(tmp_path: Path) -> None:
    manifest = good_manifest()
    near = int(manifest.loc[60, "phash"], 16) ^ 0b101  # 2 bits away
    manifest.loc[61, "phash"] = f"{near:016x}"
    result = validate(tmp_path, manifest, labels=LABELS, near_duplicate_distance=4)
    assert result.success
    assert [w.name for w in result.warnings] == ["no_near_duplicates"]
    report = json.loads(result.json_path.read_text())
    summary = report["near_duplicates"]
    assert (summary["groups"], summary["images"]) == (1, 2)
    assert summary["example_pairs"] == [{"a": manifest.loc[60, "path"], "b": manifest.loc[61, "path"], "distance": 2}]
    assert "warning: no_near_duplicates" in str(result)
    # Below the distance threshold it is not a near-duplicate at all.
    assert not validate(tmp_path, manifest, labels=LABELS, near_duplicate_distance=1).warnings


def test_exact_copies_are_not_counted_as_near_duplicates(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest.loc[7, ["sha256", "phash"]] = manifest.loc[6, ["sha256", "phash"]].to_numpy()
    _, report = failed_gate(tmp_path, manifest, labels=LABELS)
    assert check(report, "sha256_unique")["success"] is False
    assert check(report, "no_near_duplicates")["success"] is True


def test_label_pinning_flow(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    validate(tmp_path, good_manifest(), labels=None)
    lock = json.loads(layout.labels_lock.read_text())
    assert lock["labels"] == sorted(LABELS) and lock["pinned_at"]

    grown = good_manifest(labels=[*LABELS, "dent"])
    message, report = failed_gate(tmp_path, grown, labels=None)
    assert check(report, "label_in_expected_set")["unexpected_count"] == PER_CLASS
    assert "validate.labels" in message and "labels.lock.json" in message

    shrunk = good_manifest(labels=LABELS[:3])
    _, report = failed_gate(tmp_path, shrunk, labels=None)
    assert check(report, "expected_labels_present")["examples"] == [LABELS[3]]

    assert validate(tmp_path, grown, labels=[*LABELS, "dent"]).success
    layout.labels_lock.unlink()
    assert validate(tmp_path, grown, labels=None).success
    assert json.loads(layout.labels_lock.read_text())["labels"] == sorted([*LABELS, "dent"])


def only_failed_check(tmp_path: Path) -> dict[str, Any]:
    report = json.loads(Layout(tmp_path).validation_json.read_text())
    assert report["success"] is False and Layout(tmp_path).validation_html.is_file()
    failed = [c for c in report["checks"] if not c["success"]]
    assert len(failed) == 1, failed
    return failed[0]


def test_corrupt_label_lock_is_a_clear_error_with_a_report(tmp_path: Path) -> None:
    Layout(tmp_path).labels_lock.write_text("{not json")
    with pytest.raises(GateFailedError, match="labels.lock.json"):
        validate(tmp_path, good_manifest(), labels=None)
    assert only_failed_check(tmp_path)["name"] == "label_lock_readable"


def test_missing_manifest_names_the_file_and_writes_the_report(tmp_path: Path) -> None:
    with pytest.raises(GateFailedError, match="manifest.parquet"):
        run_validate(make_params(), Layout(tmp_path))
    failed = only_failed_check(tmp_path)
    assert failed["name"] == "manifest_readable" and "lensmith ingest" in failed["hint"]


def test_empty_manifest_fails_with_a_report_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(GateFailedError, match="no rows"):
        validate(tmp_path, good_manifest().iloc[:0])
    assert "data.source" in only_failed_check(tmp_path)["hint"]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(GateFailedError, match=r"lacks required column\(s\): sha256, phash"):
        validate(tmp_path, good_manifest().drop(columns=["sha256", "phash"]))
    message, report = failed_gate(tmp_path, good_manifest().drop(columns=["batch"]))
    assert "params_match_data" in message and "validate.required_metadata='batch'" in message
    assert check(report, "params_match_data")["examples"] == ["validate.required_metadata='batch'"]


def test_auto_settings_resolve_from_the_manifest_and_are_reported(tmp_path: Path) -> None:
    result = validate(tmp_path, good_manifest(), required_metadata="auto")
    resolved = json.loads(Layout(tmp_path).validation_json.read_text())["resolved"]
    assert resolved["validate.required_metadata"] == ["site", "batch"]
    assert resolved["split.group_column"] == "batch"
    assert resolved["evaluate.slices"] == ["site"]  # batch is the group column
    assert resolved["evaluate.negative_class"] == "ok"
    assert "settings resolved from the data" in str(result) and "split.group_column = 'batch'" in str(result)


def test_a_stray_blank_image_is_reported_and_many_fail_the_gate(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest.loc[[7], "contrast"] = 0.0
    result = validate(tmp_path, manifest, max_bad_fraction=0.05)
    blank = next(c for c in result.checks if c.name == "not_blank")
    assert result.success and blank.success and blank.unexpected_count == 1 and blank.examples == [manifest.loc[7, "path"]]
    manifest.loc[range(0, 120, 10), "contrast"] = 0.0  # with row 7: 13 of 120 = 11% > 5%
    message, report = failed_gate(tmp_path, manifest, max_bad_fraction=0.05)
    assert "not_blank" in message and check(report, "not_blank")["unexpected_count"] == 13


def test_a_plain_folder_needs_no_metadata(tmp_path: Path) -> None:
    manifest = good_manifest(labels=["0", "1", "2"]).drop(columns=["site", "batch"])
    result = validate(tmp_path, manifest, required_metadata="auto", labels=None)
    assert result.success
    resolved = json.loads(Layout(tmp_path).validation_json.read_text())["resolved"]
    assert resolved["validate.required_metadata"] == [] and resolved["evaluate.negative_class"] is None


def test_params_naming_what_the_data_lacks_fail_before_training(tmp_path: Path) -> None:
    params = make_params()
    params.evaluate.negative_class = "good"
    params.evaluate.slices = ["site", "line"]
    params.split.min_class_size = PER_CLASS + 1
    layout = Layout(tmp_path)
    layout.data.mkdir(parents=True)
    good_manifest().to_parquet(layout.manifest, index=False)
    with pytest.raises(GateFailedError) as caught:
        run_validate(params, layout)
    report = json.loads(layout.validation_json.read_text())
    assert sorted(check(report, "params_match_data")["examples"]) == ["evaluate.negative_class='good'", "evaluate.slices='line'"]
    assert check(report, "split_min_class_size")["success"] is False
    assert "split.min_class_size" in str(caught.value)


def write_project(tmp_path: Path, manifest: pd.DataFrame) -> Path:
    layout = Layout(tmp_path)
    layout.data.mkdir(parents=True)
    manifest.to_parquet(layout.manifest, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"validate:\n  labels: {json.dumps(LABELS)}\n  required_metadata: [site]\n")
    return params_file


def test_cli_exit_code_and_stderr_summary_on_failure(tmp_path: Path) -> None:
    manifest = good_manifest()
    manifest.loc[5, "sha256"] = manifest.loc[6, "sha256"]
    params_file = write_project(tmp_path, manifest)
    result = CliRunner().invoke(app, ["validate", "--params", str(params_file), "--root", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "sha256_unique: 2 rows" in result.stderr
    assert manifest.loc[5, "path"] in result.stderr
    assert Layout(tmp_path).validation_json.exists()


def test_cli_success(tmp_path: Path) -> None:
    params_file = write_project(tmp_path, good_manifest())
    result = CliRunner().invoke(app, ["validate", "--params", str(params_file), "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "data validation passed" in result.stdout
