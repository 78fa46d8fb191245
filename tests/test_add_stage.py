"""Adding a stage is one function, one stage-table row and one dvc.yaml entry (README, "Adding a stage"):
done to a copy of the project, the new stage gets its `lensmith` command, `dvc repro` runs it, and the Prefect
flow runs it in-process in DVC's graph, with the same output and a clean `dvc status` either way."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from lensmith.testing.project import make_project, run, tool_env

pytestmark = pytest.mark.slow

FUNCTION = '''

def _label_counts(params: Params, layout: Layout, minimum: int = 0) -> Any:
    """Images per label in the manifest (the example stage of the README's "Adding a stage")."""
    import pandas as pd

    from lensmith.fsutil import write_json_atomic

    counts = pd.read_parquet(layout.root / "data" / "manifest.parquet", columns=["label"])["label"].value_counts()
    kept = {str(label): int(n) for label, n in sorted(counts.items()) if n >= minimum}
    write_json_atomic(layout.reports / "label_counts.json", kept)
    return f"{len(kept)} labels"

'''
ROW = '''    Stage(
        name="label_counts",
        run=_label_counts,
        help="Images per label in the manifest: reports/label_counts.json.",
        options=(StageOption("minimum", int, 0, "Leave out labels with fewer images"),),
        dvc_options={"minimum": 1},
    ),
'''
ENTRY = {
    "cmd": "lensmith label-counts --minimum 1",
    "deps": ["data/manifest.parquet", "lensmith/stages.py"],
    "outs": [{"reports/label_counts.json": {"cache": False}}],
}


def add_label_counts_stage(root: Path) -> None:
    """The three edits, as a user would make them (the demo and ingest stages are all it needs upstream)."""
    stages_py = root / "lensmith" / "stages.py"
    text = stages_py.read_text(encoding="utf-8")
    table = text.index("# ---- the table")
    text = text[:table] + FUNCTION.lstrip("\n") + "\n" + text[table:]
    end = text.index("\n)\n\nSTAGE_TABLE")
    stages_py.write_text(text[: end + 1] + ROW + text[end + 1 :], encoding="utf-8")
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("demo_data", "ingest")} | {"label_counts": ENTRY}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "label_counts stage"], root)


def project_env(root: Path) -> dict[str, str]:
    """The copy's lensmith package first (as if the user edited their own checkout)."""
    return tool_env({"PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")})


def flow_stages(stdout: str) -> dict[str, str]:
    """`lensmith run` prints `  <stage> ran|unchanged (<s>s)` per stage."""
    words = [line.split() for line in stdout.split("reports:")[0].splitlines() if line.startswith("  ")]
    return {w[0]: w[1] for w in words if len(w) >= 2}


def dvc_status(root: Path) -> str:
    return run([sys.executable, "-m", "dvc", "status", "--json"], root, env=project_env(root)).stdout.strip()


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("addstage")
    pair = (make_project(base / "by_dvc"), make_project(base / "by_flow"))
    for root in pair:
        add_label_counts_stage(root)
    return pair


def test_the_new_stage_has_its_command(projects: tuple[Path, Path]) -> None:
    root = projects[0]
    proc = run([sys.executable, "-m", "lensmith.cli", "label-counts", "--help"], root, env=project_env(root))
    assert "--minimum" in proc.stdout and "Images per label" in proc.stdout


def test_dvc_repro_and_the_flow_run_the_new_stage_alike(projects: tuple[Path, Path]) -> None:
    by_dvc, by_flow = projects
    proc = run([sys.executable, "-m", "dvc", "repro"], by_dvc, env=project_env(by_dvc))
    assert "Running stage 'label_counts'" in proc.stdout
    proc = run([sys.executable, "-m", "lensmith.cli", "run"], by_flow, env=project_env(by_flow), timeout=1200)
    assert flow_stages(proc.stdout) == {"demo_data": "ran", "ingest": "ran", "label_counts": "ran"}, proc.stdout
    counts = json.loads((by_flow / "reports" / "label_counts.json").read_text())
    assert counts == json.loads((by_dvc / "reports" / "label_counts.json").read_text())
    assert len(counts) >= 2 and all(n >= 1 for n in counts.values())
    assert dvc_status(by_dvc) == "{}" and dvc_status(by_flow) == "{}"
    # each records the run the other would make: nothing left to do either way
    again = run([sys.executable, "-m", "dvc", "repro"], by_flow, env=project_env(by_flow))
    assert "Running stage" not in again.stdout
    again = run([sys.executable, "-m", "lensmith.cli", "run"], by_dvc, env=project_env(by_dvc), timeout=1200)
    assert set(flow_stages(again.stdout).values()) == {"unchanged"}, again.stdout
