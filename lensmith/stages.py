"""The stage table: what each pipeline stage is, declared once (the logic side of the wiring; no Prefect, no DVC).

`dvc.yaml` declares the graph (deps, params, outs); this table declares the rest of a stage: the function that
runs it in-process, its `lensmith <stage>` command and options, the arguments dvc.yaml's command passes, whether
it reads the split images (a remote worker downloads them) or mostly waits on storage (retried), and what the
flow publishes from its outputs. Everything else is derived from the two: the CLI's stage commands
(`lensmith/cli.py`), the flow's graph (DVC's resolved graph, `tasks/pipeline.py`), the in-process executor
(`tasks/dvc_inprocess.py`), the retries (`tasks/stages.py`), the artifacts (`tasks/artifacts.py`) and the remote
runner (`lensmith/remote.py`).

Adding a stage: one function here, one row in STAGES, one entry in dvc.yaml (README, "Adding a stage").
This module stays import-light: the CLI builds its commands from it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lensmith.artifacts import Artifact
    from lensmith.layout import Layout
    from lensmith.params import Params


@dataclass(frozen=True)
class StageOption:
    """A command-line option of a stage (`--resume`): also a keyword argument of the stage's function."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Relaunch:
    """Run this command instead of the stage function in this process, and why."""

    command: list[str]
    reason: str


@dataclass(frozen=True)
class Stage:
    name: str  # the dvc.yaml stage name
    run: Callable[..., Any]  # (params, layout, **options) -> a summary printed by the CLI and logged by the flow
    help: str
    options: tuple[StageOption, ...] = ()
    dvc_options: dict[str, Any] = field(default_factory=dict)  # the options dvc.yaml's command passes
    reads_images: bool = False  # reads the image files the splits list (a remote worker downloads them first)
    io_bound: bool = False  # mostly waits on storage (local disk, S3): the flow retries it with backoff
    publishes: Callable[[Layout], list[Artifact]] | None = None  # what the flow shows from the stage's outputs
    # The command to run instead of this process (e.g. training under torchrun), given params and the CLI's arguments
    relaunch: Callable[[Params, list[str]], Relaunch | None] | None = None

    @property
    def command(self) -> str:
        """The CLI command: `drift_reference` -> `drift-reference`."""
        return self.name.replace("_", "-")

    def option(self, name: str) -> StageOption:
        return next(o for o in self.options if o.name == name)

    def stock_command(self) -> list[str]:
        """The words of dvc.yaml's command for this stage (only then is the stage function equivalent to it)."""
        words = ["lensmith", self.command]
        for name, value in self.dvc_options.items():
            flag = self.option(name).flag
            words += ([flag] if value else []) if isinstance(value, bool) else [flag, str(value)]
        return words

    def relaunches(self, params: Params) -> bool:
        """Whether the stage cannot run in this process with these params (it relaunches itself)."""
        return self.relaunch is not None and self.relaunch(params, []) is not None


# ---- the stage functions -------------------------------------------------------------------------------------


def _demo_data(
    params: Params, layout: Layout, out: Path | None = None, site: str | None = None,
    seed: int | None = None, per_class: int | None = None,
) -> Any:
    from lensmith.demodata import generate_demo_dataset

    if out is None:
        out = layout.root / (f"{params.demo.out}_site_{site.lower()}" if site else params.demo.out)
    return generate_demo_dataset(
        out,
        sites=[site] if site else None,
        seed=params.demo.seed if seed is None else seed,
        per_class=per_class or params.demo.per_class,
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


def _train(params: Params, layout: Layout, resume: bool = False) -> Any:
    from lensmith.train import run_train

    return run_train(params, layout, resume=resume)


def _train_relaunch(params: Params, cli_args: list[str]) -> Relaunch | None:
    """train.processes > 1 outside torchrun: `lensmith train` again under torchrun (DistributedDataParallel)."""
    processes = params.train.processes
    if processes <= 1:
        return None  # without importing torch (lensmith.distributed does): a no-op flow run never needs it
    from lensmith.distributed import needs_torchrun, torchrun_command

    if not needs_torchrun(processes):
        return None
    reason = f"train.processes={processes}: relaunching under torchrun (DistributedDataParallel)"
    return Relaunch(torchrun_command(processes, ["train", *cli_args]), reason)


def _evaluate(params: Params, layout: Layout) -> Any:
    from lensmith.evaluate import run_evaluate

    return run_evaluate(params, layout)


def _export(params: Params, layout: Layout, tensorrt: bool = False) -> Any:
    from lensmith.export import run_export

    return run_export(params, layout, tensorrt=tensorrt)


def _drift_reference(params: Params, layout: Layout) -> Any:
    from lensmith.drift.reference import build_reference

    return f"drift reference -> {build_reference(params, layout, layout.candidate)}"


def _gate(params: Params, layout: Layout, report_only: bool = False) -> Any:
    from lensmith.gate import run_gate

    return run_gate(params, layout, raise_on_reject=not report_only)


def _publishes(name: str) -> Callable[[Layout], list[Artifact]]:
    """lensmith.artifacts.<name>, imported when the flow publishes (pandas stays out of CLI start-up)."""

    def publish(layout: Layout) -> list[Artifact]:
        from lensmith import artifacts

        return getattr(artifacts, name)(layout)

    publish.__name__ = name
    return publish


# ---- the table -----------------------------------------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage(
        name="demo_data",
        run=_demo_data,
        help="Generate the embedded, seeded tile-inspection demo set (ImageFolder tree + metadata.csv), offline.",
        options=(
            StageOption("out", Path, None, "Output folder (default: demo.out from params)"),
            StageOption("site", str, None, "A, B or C; default: the training sites A and B"),
            StageOption("seed", int, None, "Random seed (default: demo.seed)"),
            StageOption("per_class", int, None, "Images per class (default: demo.per_class)"),
        ),
        io_bound=True,
    ),
    Stage(
        name="ingest",
        run=_ingest,
        help="Read data.source (folder, CSV manifest or s3://) into data/manifest.parquet; bad files go to "
        "data/quarantine.csv.",
        io_bound=True,
    ),
    Stage(
        name="validate",
        run=_validate,
        help="The data gate (Great Expectations): writes reports/validation.{json,html}; exit 1 when it fails.",
        publishes=_publishes("validation_artifacts"),
    ),
    Stage(
        name="split",
        run=_split,
        help="Stratified, group-aware, stable train/val/test split into data/splits/; checks leakage between splits.",
        publishes=_publishes("split_artifacts"),
    ),
    Stage(
        name="train",
        run=_train,
        help="Transfer-learning training into models/candidate/ (checkpoint every epoch, dvclive metrics).",
        options=(StageOption("resume", bool, False, "Continue from models/candidate/checkpoint.pt"),),
        reads_images=True,
        publishes=_publishes("training_artifacts"),
        relaunch=_train_relaunch,
    ),
    Stage(
        name="evaluate",
        run=_evaluate,
        help="Test-split metrics, per-slice fairness, robustness and calibration: reports/metrics.json + "
        "evaluation.html.",
        reads_images=True,
        publishes=_publishes("evaluation_artifacts"),
    ),
    Stage(
        name="export",
        run=_export,
        help="ONNX export with the parity gate, ORT EXTENDED graph and accuracy-gated int8: models/candidate/, "
        "reports/export.json.",
        options=(
            StageOption(
                "tensorrt", bool, False,
                "Also build a parity-gated TensorRT plan (model.plan; needs the tensorrt package and a CUDA GPU); "
                "export.tensorrt asks for it in every run",
            ),
        ),
        reads_images=True,
    ),
    Stage(
        name="drift_reference",
        run=_drift_reference,
        help="Build models/candidate/drift_reference.{parquet,json} from the train/val splits and the exported "
        "model.onnx.",
        reads_images=True,  # image stats and embeddings of the train/val images
    ),
    Stage(
        name="gate",
        run=_gate,
        help="Champion/challenger gate + absolute floors: writes reports/gate.{json,html}; exit 1 on reject.",
        options=(
            StageOption(
                "report_only", bool, False,
                "Exit 0 on reject (the decision is in reports/gate.json); the DVC stage uses this",
            ),
        ),
        dvc_options={"report_only": True},
        publishes=_publishes("gate_artifacts"),
    ),
)

STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in STAGES}
TRAINING_STAGES: tuple[str, ...] = tuple(STAGE_TABLE)


def stage_named(name: str) -> Stage:
    try:
        return STAGE_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_TABLE)}") from None


def run_stage(name: str, params: Params, layout: Layout) -> Any:
    """Run one stage in-process exactly as dvc.yaml's command would (its options included); return its summary."""
    stage = stage_named(name)
    return stage.run(params, layout, **stage.dvc_options)
