"""`lensmith init`: what it learns from a source, what it chooses and why, and the project it writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from lensmith.params import load_params
from lensmith.projectinit import InitError, image_size_for, inspect_source, plan_for, write_project
from lensmith.sampledata import write_sample_set


def test_inspection_of_a_plain_folder(tmp_path: Path) -> None:
    write_sample_set("digits", tmp_path / "digits", per_class=15)
    inspection = inspect_source(str(tmp_path / "digits"))
    assert inspection.n_images == 150 and len(inspection.class_counts) == 10
    assert (inspection.median_side, inspection.modes, inspection.metadata_columns) == (8.0, {"L": 150}, [])


def test_choices_follow_the_data(tmp_path: Path) -> None:
    write_sample_set("textures", tmp_path / "tex", per_class=12)
    plan = plan_for(inspect_source(str(tmp_path / "tex")), orientation="free")
    chosen = plan.overrides()
    assert chosen["train.image_size"] == 64  # 64 px patches
    assert chosen["validate.required_metadata"] == ["region"] and chosen["evaluate.slices"] == ["region"]
    assert chosen["split.group_column"] is None and chosen["evaluate.negative_class"] is None
    assert (chosen["train.augment.vflip"], chosen["train.augment.rotation_degrees"]) == (True, 15.0)
    assert all(choice.why for choice in plan.choices)
    assert [image_size_for(s) for s in (8, 64, 65, 96, 500)] == [64, 64, 96, 96, 128]


def test_a_class_too_small_to_split_is_refused(tmp_path: Path) -> None:
    write_sample_set("faces", tmp_path / "faces", per_class=6)
    with pytest.raises(InitError, match="fewer than 10 images"):
        plan_for(inspect_source(str(tmp_path / "faces")))


def test_the_project_is_versioned_and_its_params_load(tmp_path: Path) -> None:
    write_sample_set("faces", tmp_path / "faces", per_class=12, layout="csv", metadata=False)
    plan = plan_for(inspect_source(str(tmp_path / "faces" / "manifest.csv")))
    created = write_project(tmp_path / "proj", plan)
    project = tmp_path / "proj"
    assert created["source"] == "data/raw/faces/manifest.csv"
    params = load_params(project / "params.yaml")
    assert params.data.source == "data/raw/faces/manifest.csv" and params.train.image_size == 64
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    assert "demo_data" not in pipeline["stages"]
    assert not [d for stage in pipeline["stages"].values() for d in stage.get("deps", []) if str(d).startswith("lensmith/")]
    assert (project / "data" / "raw" / "faces.dvc").is_file()
    log = subprocess.run(["git", "log", "--oneline"], cwd=project, capture_output=True, text=True, check=True).stdout
    assert len(log.splitlines()) == 1 and "lensmith init" in log
    clean = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True).stdout
    assert clean.strip() == ""
    with pytest.raises(InitError, match="never overwrites"):
        write_project(project, plan)


def test_a_failure_half_way_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lensmith.projectinit as projectinit

    write_sample_set("faces", tmp_path / "faces", per_class=12)
    plan = plan_for(inspect_source(str(tmp_path / "faces")))
    real = projectinit.run_tool

    def failing_dvc_add(args: list[str], cwd: Path) -> None:
        if "add" in args and "dvc" in " ".join(args):
            raise InitError("dvc add failed: disk full")
        real(args, cwd)

    monkeypatch.setattr(projectinit, "run_tool", failing_dvc_add)
    with pytest.raises(InitError, match="disk full"):
        write_project(tmp_path / "proj", plan)
    assert not (tmp_path / "proj").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    with pytest.raises(InitError):
        write_project(existing, plan)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
