"""orchestration.task_runner: a sweep on a local Dask cluster of 2 worker processes equals the sequential run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lensmith.errors import LensmithError
from lensmith.layout import Layout
from lensmith.params import apply_overrides, load_params, params_from_dict, read_params_yaml
from lensmith.stages import run_stage
from lensmith.testing.project import REPO, TINY_OVERRIDES

SWEEP_CONFIGS = [{"train.lr": 0.001}, {"train.lr": 0.003}]
# Smaller than the tiny project: two 1-epoch configs, no robustness suite, so each task is a few seconds.
SWEEP_OVERRIDES = [
    "demo.per_class=16",
    "train.model=mobilenet_v3_small",
    "train.pretrained=false",
    "train.batch_size=16",
    "evaluate.robustness.perturbations=[]",
]


def split_project(root: Path, extra: list[str], stages: tuple[str, ...] = ("demo_data", "ingest", "validate", "split")) -> Path:
    """A project folder with params.yaml and `stages` (up to split) run in-process (no git/DVC needed)."""
    root.mkdir(parents=True, exist_ok=True)
    raw = apply_overrides(read_params_yaml(REPO / "params.yaml"), TINY_OVERRIDES + extra)
    params = params_from_dict(raw, "test params")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in stages:
        run_stage(stage, params, Layout(root))
    return root


def test_task_runner_from_params() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from tasks.runners import task_runner_for

    assert isinstance(task_runner_for(load_params(REPO / "params.yaml")), ThreadPoolTaskRunner)
    dask = task_runner_for(load_params(REPO / "params.yaml", ["orchestration.task_runner=dask", "orchestration.dask_n_workers=3"]))
    assert isinstance(dask, DaskTaskRunner)
    assert dask.cluster_kwargs["n_workers"] == 3 and dask.cluster_kwargs["processes"] is True
    remote = task_runner_for(load_params(REPO / "params.yaml", ["orchestration.task_runner=dask", "orchestration.dask_address=tcp://10.0.0.5:8786"]))
    assert remote.address == "tcp://10.0.0.5:8786"


def test_ray_runner_is_a_clear_error_when_not_installed() -> None:
    pytest.importorskip("prefect")
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("prefect-ray is installed here")
    from tasks.runners import task_runner_for

    with pytest.raises(LensmithError, match="prefect-ray is not installed"):
        task_runner_for(load_params(REPO / "params.yaml", ["orchestration.task_runner=ray"]))


@pytest.mark.slow
def test_sweep_on_dask_equals_sequential(tmp_path: Path) -> None:
    from flows.sweep import sweep_flow

    root = split_project(tmp_path / "proj", SWEEP_OVERRIDES)
    sequential = sweep_flow(
        str(root), configs=SWEEP_CONFIGS,
        overrides=["orchestration.task_runner=thread", "orchestration.thread_max_workers=1"],
    )
    on_dask = sweep_flow(
        str(root), configs=SWEEP_CONFIGS,
        overrides=["orchestration.task_runner=dask", "orchestration.dask_n_workers=2"],
    )
    assert [r["config"] for r in on_dask] == SWEEP_CONFIGS
    for seq, dsk in zip(sequential, on_dask, strict=True):
        assert dsk["weights_sha256"] == seq["weights_sha256"]
        assert dsk["test_accuracy"] == seq["test_accuracy"] and dsk["test_macro_f1"] == seq["test_macro_f1"]
        assert dsk["best_val_metrics"] == seq["best_val_metrics"]
    # the Dask tasks really ran in other processes (the worker processes), the sequential ones here
    assert {r["worker_pid"] for r in sequential} == {__import__("os").getpid()}
    assert __import__("os").getpid() not in {r["worker_pid"] for r in on_dask}
    # the two configurations differ (the sweep is not returning one result twice)
    assert sequential[0]["weights_sha256"] != sequential[1]["weights_sha256"]
    assert not any((root / ".cache" / "sweeps").iterdir())
