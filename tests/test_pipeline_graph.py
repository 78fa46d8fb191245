"""dvc.yaml and the Prefect training flow declare the same stage graph (one definition per stage)."""

from __future__ import annotations

from pathlib import Path

import yaml
from dvc.repo import Repo

from flows.training import FLOW_GRAPH, flow_graph, stage_order
from lensmith.stages import STAGE_FUNCTIONS, TRAINING_STAGES
from tasks.dvc_inprocess import runs_lensmith_stage

ROOT = Path(__file__).resolve().parents[1]


def dvc_graph(root: Path) -> dict[str, set[str]]:
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        deps: dict[str, set[str]] = {stage.addressing: set() for stage in graph.nodes}
        for stage, upstream in graph.edges:
            deps[stage.addressing].add(upstream.addressing)
    return deps


def test_flow_graph_equals_dvc_graph() -> None:
    assert {s: set(u) for s, u in FLOW_GRAPH.items()} == dvc_graph(ROOT)


def test_every_stage_has_an_in_process_function_and_a_cli_command() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(TRAINING_STAGES) == set(STAGE_FUNCTIONS)
    for name, spec in stages.items():
        # the flow runs the stage function in-process only for the stock command: dvc.yaml must use it
        assert runs_lensmith_stage(spec["cmd"], name), spec["cmd"]


def test_flow_runs_the_stages_of_the_projects_dvc_yaml(tmp_path: Path) -> None:
    assert stage_order(flow_graph(ROOT))[0] == "demo_data"  # whatever data.source is: dvc status stays clean
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del pipeline["stages"]["demo_data"]  # as `lensmith init` writes it
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    graph = flow_graph(tmp_path)
    assert stage_order(graph) == ["ingest", "validate", "split", "train", "evaluate", "export", "drift_reference", "gate"]
