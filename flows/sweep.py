"""Many independent jobs on the task runner from params: hyper-parameter sweeps and per-site fine-tuning.

`sweep_flow` trains, exports and evaluates each configuration (a dict of dotted params overrides) as its own
task, in its own scratch project that reads the main project's splits and images (never writes them),
so tasks share nothing but the read-only inputs and the decoded-image cache (written atomically).
`site_finetune_flow` runs `lensmith.finetune.run_finetune` for each site as its own task.

With `orchestration.task_runner: dask` the tasks run in Dask worker processes (a local cluster, or an
existing one at `orchestration.dask_address` whose workers see the same filesystem). Each task pins
torch to one thread: results are then identical whichever runner ran them (same seed, same data).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from lensmith.fsutil import write_bytes_atomic
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.params import Params, apply_overrides, load_params, params_from_dict, read_params_yaml
from tasks.runners import check_task_runner_reachable, task_runner_for

SWEEP_STAGES: tuple[str, ...] = ("train", "export", "evaluate")  # evaluation measures the exported model


def config_overrides(config: dict[str, Any]) -> list[str]:
    """{"train.lr": 0.01} -> ["train.lr=0.01"] (JSON values are valid YAML, so types survive)."""
    return [f"{key}={json.dumps(value)}" for key, value in sorted(config.items())]


def config_params(params_path: Path, config: dict[str, Any]) -> Params:
    """params.yaml with the configuration applied and torch pinned to one thread per task."""
    overrides = config_overrides(config) + ["train.num_threads=1"]
    raw = apply_overrides(read_params_yaml(params_path), overrides)
    return params_from_dict(raw, f"{params_path} with sweep config {config}")


def scratch_project(source: Layout, scratch: Path) -> Layout:
    """A project in `scratch` whose splits point (absolute paths) at `source`'s images; shares its image cache."""
    layout = Layout(scratch)
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        frame = pd.read_parquet(source.split_file(name))
        frame["file"] = [str(p if Path(p).is_absolute() else source.root / p) for p in frame["file"].astype(str)]
        write_bytes_atomic(layout.split_file(name), frame.to_parquet(index=False))
    if source.manifest.is_file():
        shutil.copy2(source.manifest, layout.manifest)
    source.cache_dir.mkdir(parents=True, exist_ok=True)
    if not layout.cache_dir.exists():
        layout.cache_dir.symlink_to(source.cache_dir.resolve(), target_is_directory=True)
    return layout


def summarize_config(config: dict[str, Any], layout: Layout, seconds: float) -> dict[str, Any]:
    metrics = json.loads((layout.reports / "metrics.json").read_text(encoding="utf-8"))
    meta = json.loads((layout.candidate / "meta.json").read_text(encoding="utf-8"))
    test = metrics.get("test", {})
    return {
        "config": config,
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "best_val_metrics": meta.get("best_val_metrics", {}),
        "epochs_run": meta.get("epochs_run"),
        "weights_sha256": meta.get("weights_sha256"),
        "seconds": round(seconds, 2),
        "worker_pid": os.getpid(),
    }


@task(name="sweep-config", cache_policy=NO_CACHE)
def train_and_evaluate(root: str, params: Params, config: dict[str, Any], scratch: str, keep: bool) -> dict[str, Any]:
    """Train + evaluate one configuration in its own scratch project; the metrics that matter for picking one."""
    import torch

    from lensmith.stages import run_stage

    torch.set_num_threads(1)  # one task per core; also what makes runs identical across runners
    start = time.perf_counter()
    layout = scratch_project(Layout(Path(root)), Path(scratch))
    try:
        for stage in SWEEP_STAGES:
            run_stage(stage, params, layout)
        return summarize_config(config, layout, time.perf_counter() - start)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def resolve_params_path(root: Path, params_file: str) -> Path:
    return Path(params_file) if Path(params_file).is_absolute() else root / params_file


@flow(name="lensmith-sweep", log_prints=True)
def sweep_flow(
    root: str = ".",
    params_file: str = "params.yaml",
    configs: list[dict[str, Any]] | None = None,
    overrides: list[str] | None = None,
    keep_scratch: bool = False,
) -> list[dict[str, Any]]:
    """Train + evaluate every configuration as an independent task on the task runner from params.

    `overrides` apply to the flow's own params (e.g. `orchestration.task_runner=dask`); `configs`
    are per-task. Results come back in the order of `configs`.
    """
    logger = get_run_logger()
    root_path = Path(root).resolve()
    params_path = resolve_params_path(root_path, params_file)
    params = load_params(params_path, overrides or [])
    check_task_runner_reachable(params.orchestration)
    configs = configs or [{}]
    all_params = [config_params(params_path, {**dict(_pairs(overrides or [])), **c}) for c in configs]
    scratch_parent = root_path / ".cache" / "sweeps"
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=scratch_parent))
    logger.info("sweep of %d configuration(s) on the %s task runner", len(configs), params.orchestration.task_runner)
    try:
        with task_runner_for(params) as runner:
            futures = [
                runner.submit(
                    train_and_evaluate,
                    {"root": str(root_path), "params": p, "config": c, "scratch": str(scratch / f"config-{i}"), "keep": keep_scratch},
                )
                for i, (p, c) in enumerate(zip(all_params, configs, strict=True))
            ]
            results = [f.result() for f in futures]
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    for r in results:
        logger.info("%s: test accuracy %s, macro-F1 %s (%ss)", r["config"], r["test_accuracy"], r["test_macro_f1"], r["seconds"])
    return results


def _pairs(overrides: list[str]) -> list[tuple[str, Any]]:
    from lensmith.params import parse_override

    return [(".".join(parts), value) for parts, value in map(parse_override, overrides)]


@task(name="site-finetune", cache_policy=NO_CACHE)
def finetune_site(root: str, params: Params, site: str, register: bool) -> dict[str, Any]:
    """lensmith.finetune for one site (registry writes are serialised by the registry's own file lock)."""
    import torch

    from lensmith.finetune import run_finetune

    torch.set_num_threads(1)
    summary = run_finetune(params, Layout(Path(root)), site, register=register)
    return {
        "site": summary.site,
        "parent_version": summary.parent_version,
        "version": summary.version,
        "passed": summary.passed,
        "reasons": summary.reasons,
        "site_accuracy_before": summary.site_accuracy_before,
        "site_accuracy_after": summary.site_accuracy_after,
        "test_accuracy_after": summary.test_accuracy_after,
        "report": str(summary.report),
    }


@flow(name="lensmith-site-finetune", log_prints=True)
def site_finetune_flow(
    root: str = ".", sites: list[str] | None = None, params_file: str = "params.yaml",
    overrides: list[str] | None = None, register_versions: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune production for each site as an independent task on the task runner from params."""
    root_path = Path(root).resolve()
    params = load_params(resolve_params_path(root_path, params_file), (overrides or []) + ["train.num_threads=1"])
    check_task_runner_reachable(params.orchestration)
    with task_runner_for(params) as runner:
        futures = [
            runner.submit(finetune_site, {"root": str(root_path), "params": params, "site": s, "register": register_versions})
            for s in sites or []
        ]
        return [f.result() for f in futures]
