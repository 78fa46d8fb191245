"""dvc.yaml plus the stage table are the only definition of the pipeline: the flow's graph is DVC's, every
dvc.yaml stage has its row (function, command), and dvc.yaml runs each stage's stock command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo
from typer.testing import CliRunner

from flows.nightly import recorded_paths
from flows.training import stage_order
from lensmith.cli import app
from lensmith.params import load_params
from lensmith.stages import STAGE_TABLE, TRAINING_STAGES
from tasks.dvc_inprocess import runs_lensmith_stage
from tasks.pipeline import PipelineError, flow_graph, stage_io

ROOT = Path(__file__).resolve().parents[1]


def dvc_graph(root: Path) -> dict[str, set[str]]:
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        deps: dict[str, set[str]] = {stage.addressing: set() for stage in graph.nodes}
        for stage, upstream in graph.edges:
            deps[stage.addressing].add(upstream.addressing)
    return deps


def test_flow_graph_is_dvcs_graph() -> None:
    graph = flow_graph(ROOT)
    assert {s: set(u) for s, u in graph.items()} == dvc_graph(ROOT)
    assert graph["gate"] == ("evaluate", "export", "split", "train")
    assert "export" in graph["evaluate"]  # evaluation measures the exported model that is served
    assert stage_order(graph)[0] == "demo_data"  # whatever data.source is: dvc status stays clean


def test_every_stage_has_a_row_a_cli_command_and_dvc_runs_its_stock_command() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(TRAINING_STAGES)
    commands = {c.name for c in app.registered_commands}
    for name, spec in stages.items():
        # the flow runs the stage function in-process only for the stock command: dvc.yaml must use it
        assert runs_lensmith_stage(spec["cmd"], name), spec["cmd"]
        assert STAGE_TABLE[name].command in commands
    assert STAGE_TABLE["gate"].stock_command() == ["lensmith", "gate", "--report-only"]


def test_a_generated_stage_command_takes_its_own_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["gate", "--help"])
    assert result.exit_code == 0 and "--report-only" in result.output and "--root" in result.output
    result = CliRunner().invoke(app, ["split", "--root", str(tmp_path), "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_the_flow_runs_the_stages_of_the_projects_dvc_yaml(tmp_path: Path) -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del pipeline["stages"]["demo_data"]  # as `lensmith init` writes it
    pipeline["stages"]["summary"] = {"cmd": "python summary.py", "deps": ["reports/metrics.json"], "outs": ["reports/summary.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    order = stage_order(flow_graph(tmp_path))
    assert order[:3] == ["ingest", "validate", "split"] and "demo_data" not in order
    assert order.index("summary") > order.index("evaluate")


def test_a_dvc_added_folder_is_data_not_a_step_of_the_flow(tmp_path: Path) -> None:
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data" / "reviewed").mkdir(parents=True)
    # what `review import` leaves: a .dvc file per label folder it tracked
    (tmp_path / "data" / "reviewed" / "crack.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: crack\n")
    graph = flow_graph(tmp_path)
    assert not any(name.endswith(".dvc") for name in graph) and not any(".dvc" in up for ups in graph.values() for up in ups)
    assert set(graph) == set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_a_broken_dvc_yaml_is_named(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n    deps: [${nope.missing}]\n")
    with pytest.raises(PipelineError, match="cannot be read"):
        flow_graph(tmp_path)


def test_stage_io_is_resolved_by_dvc_against_the_params_object() -> None:
    params = load_params(ROOT / "params.yaml", ["data.source=/mnt/images", "demo.out=data/raw/other"])
    ingest = stage_io("ingest", params, ROOT / "dvc.yaml")
    assert "/mnt/images" in ingest.deps and "data/manifest.parquet" in ingest.outs
    assert stage_io("demo_data", params, ROOT / "dvc.yaml").outs == ["data/raw/other"]
    split = stage_io("split", params, ROOT / "dvc.yaml")
    assert split.persist == ["data/splits"] and "reports/leakage.json" in split.outs
    assert "params.yaml" not in split.deps  # a worker's params are the params object, not a file to download
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        stage_io("nope", params, ROOT / "dvc.yaml")


def test_a_nightly_run_records_every_git_tracked_output() -> None:
    paths = recorded_paths(ROOT)
    assert paths[:2] == ["dvc.lock", "params.yaml"]
    for metrics in ("reports/validation.json", "reports/leakage.json", "reports/metrics.json", "reports/gate.json",
                    "reports/export.json", "reports/train/metrics.json", "reports/plots/roc.csv", "models/registry/aliases.json"):
        assert metrics in paths
    assert "reports/metrics.json" in paths and "models/candidate/model.pt" not in paths
    assert "models/candidate/.gitignore" in paths  # DVC's ignore entries beside cached outputs


def test_the_shipped_params_have_every_key_dvc_tracks_and_a_missing_one_is_named(tmp_path: Path) -> None:
    from tasks.pipeline import check_params_present, missing_params

    assert missing_params(ROOT) == []
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["evaluate"]["operating_point"]  # a params.yaml written before the key existed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert missing_params(tmp_path) == ["export: params.yaml evaluate.operating_point"]
    with pytest.raises(PipelineError, match="evaluate.operating_point"):
        check_params_present(tmp_path)
