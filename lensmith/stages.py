"""The pipeline's stages as in-process functions (the logic side of the wiring; no Prefect, no DVC).

dvc.yaml declares the graph; each stage's `cmd` is `lensmith <stage>`, which calls the same function
listed here. The Prefect flow calls `run_stage` in its own process once DVC has found the stage stale
(orchestration.executor=dvc), runs `dvc repro --single-item STAGE` (dvc-subprocess), or calls `run_stage`
without DVC (direct).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lensmith.layout import Layout
from lensmith.params import Params

TRAINING_STAGES: tuple[str, ...] = (
    "demo_data", "ingest", "validate", "split", "train", "evaluate", "export", "drift_reference", "gate",
)


def _demo_data(params: Params, layout: Layout) -> Any:
    from lensmith.demodata import generate_demo_dataset

    out = Path(params.demo.out)
    return generate_demo_dataset(
        out if out.is_absolute() else layout.root / out,
        sites=None,
        seed=params.demo.seed,
        per_class=params.demo.per_class,
        image_size=params.demo.image_size,
        shards=params.demo.shards,
    )


def _ingest(params: Params, layout: Layout) -> Any:
    from lensmith.ingest import run_ingest

    return run_ingest(params, layout)


def _validate(params: Params, layout: Layout) -> Any:
    from lensmith.validate import run_validate

    return run_validate(params, layout)


def _split(params: Params, layout: Layout) -> Any:
    """Split, then the leakage gate on the result (raises GateFailedError after writing its reports)."""
    from lensmith.split import run_split
    from lensmith.validate import check_split_leakage

    summary = run_split(params, layout)
    check_split_leakage(params, layout)
    return summary


def _train(params: Params, layout: Layout) -> Any:
    from lensmith.train import run_train

    return run_train(params, layout)


def _evaluate(params: Params, layout: Layout) -> Any:
    from lensmith.evaluate import run_evaluate

    return run_evaluate(params, layout)


def _export(params: Params, layout: Layout) -> Any:
    from lensmith.export import run_export

    return run_export(params, layout)


def _drift_reference(params: Params, layout: Layout) -> Any:
    from lensmith.drift.reference import build_reference

    return build_reference(params, layout, layout.candidate)


def _gate(params: Params, layout: Layout) -> Any:
    from lensmith.gate import run_gate

    return run_gate(params, layout, raise_on_reject=False)


STAGE_FUNCTIONS: dict[str, Callable[[Params, Layout], Any]] = {
    "demo_data": _demo_data,
    "ingest": _ingest,
    "validate": _validate,
    "split": _split,
    "train": _train,
    "evaluate": _evaluate,
    "export": _export,
    "drift_reference": _drift_reference,
    "gate": _gate,
}


def run_stage(name: str, params: Params, layout: Layout) -> Any:
    """Run one stage in-process and return its summary object."""
    try:
        fn = STAGE_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_FUNCTIONS)}") from None
    return fn(params, layout)
