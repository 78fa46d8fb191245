"""The `lensmith` command: one subcommand per pipeline stage (wiring only; logic lives in the stage modules)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from lensmith.errors import LensmithError
from lensmith.stages import STAGES, Stage, StageOption

for _switch, _value in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    # a loaded 2-core machine needs longer than Prefect's default 20 s to start the ephemeral API
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_switch, _value)

app = typer.Typer(
    name="lensmith",
    help="Lensmith: validated data -> transfer learning -> evaluation -> export -> serving -> drift, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(value: bool) -> None:
    if value:
        from lensmith import __version__

        typer.echo(f"lensmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Lensmith: validated data -> transfer learning -> evaluation -> export -> serving -> drift, reproducibly."""

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a params.yaml key for this run, e.g. --set train.epochs=3 (repeatable)"),
]
RootOpt = Annotated[Path, typer.Option("--root", help="Project root that holds data/, models/ and reports/")]


def user_errors(fn: F) -> F:
    """Turn LensmithError into a one-paragraph message on stderr and its exit code (no traceback wall)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LensmithError as exc:
            typer.secho(f"lensmith: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("lensmith: interrupted; outputs already written are intact", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _context(params_file: Path, overrides: list[str] | None, root: Path):  # noqa: ANN202
    from lensmith.layout import Layout
    from lensmith.params import load_params

    return load_params(params_file, overrides or []), Layout(root.resolve())


def _option_words(option: StageOption, value: Any) -> list[str]:
    """How `value` of `option` is written on a command line (to relaunch the same command)."""
    if option.type is bool:
        return [option.flag] if value else []
    return [] if value is None else [option.flag, str(value)]


def _stage_command(stage: Stage) -> Callable[..., None]:
    """`lensmith <stage>`: the common options (--params, --set, --root) plus the stage's own, from the stage table."""

    def command(params_file: Path, overrides: list[str] | None, root: Path, **options: Any) -> None:
        params, layout = _context(params_file, overrides, root)
        if stage.relaunch is not None:
            args = ["--params", str(params_file), "--root", str(root), *[w for o in overrides or [] for w in ("--set", o)]]
            args += [w for o in stage.options for w in _option_words(o, options[o.name])]
            relaunched = stage.relaunch(params, args)
            if relaunched is not None:
                typer.echo(relaunched.reason)
                raise typer.Exit(subprocess.run(relaunched.command, check=False).returncode)
        typer.echo(str(stage.run(params, layout, **options)))

    own = [
        inspect.Parameter(
            o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
            annotation=Annotated[o.type if o.type is bool else Optional[o.type], typer.Option(o.flag, help=o.help)],
        )
        for o in stage.options
    ]
    common = [
        inspect.Parameter("params_file", inspect.Parameter.KEYWORD_ONLY, default=Path("params.yaml"), annotation=ParamsOpt),
        inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SetOpt),
        inspect.Parameter("root", inspect.Parameter.KEYWORD_ONLY, default=Path("."), annotation=RootOpt),
    ]
    wrapped = user_errors(command)
    wrapped.__signature__ = inspect.Signature(own + common)  # type: ignore[attr-defined]
    wrapped.__annotations__ = {p.name: p.annotation for p in own + common}
    wrapped.__doc__ = stage.help
    wrapped.__name__ = stage.name
    return wrapped


for _stage in STAGES:
    app.command(_stage.command)(_stage_command(_stage))


@app.command("sample-data")
@user_errors
def sample_data(
    name: Annotated[str, typer.Argument(help="digits | faces | fashion | textures")],
    out: Annotated[Path, typer.Argument(help="New folder to write the images into")],
    per_class: Annotated[Optional[int], typer.Option(help="At most this many images per class (default: all)")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Also write manifest.csv (path,label[,metadata]) to use as the source")] = False,
) -> None:
    """Write a small real image set (not the demo's) as a user's own data, to try `lensmith init` on.

    digits: scikit-learn's 8x8 handwritten digits; faces: scikit-image's 25x25 LFW face/non-face crops;
    fashion: Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist); textures: scikit-image's CC0 photos.
    """
    from lensmith.sampledata import write_sample_set

    typer.echo(str(write_sample_set(name, out, per_class=per_class, layout="csv" if csv else "folder")))


@app.command()
@user_errors
def init(
    source: Annotated[str, typer.Argument(help="Image folder (<class>/<file>), CSV manifest (path,label[,metadata...]) or s3://bucket/prefix")],
    directory: Annotated[Path, typer.Argument(help="Project folder to create (never overwritten)")] = Path("."),
    orientation: Annotated[
        str,
        typer.Option(help="fixed: no flips/rotations (digits, text, parts); mirror: left-right flips; free: flips + rotations (tiles, textures)"),
    ] = "fixed",
    remote: Annotated[Optional[str], typer.Option(help="DVC default remote, e.g. s3://bucket/lensmith")] = None,
    s3_endpoint_url: Annotated[Optional[str], typer.Option(help="S3-compatible endpoint for the source and the remote")] = None,
    copy: Annotated[bool, typer.Option("--copy/--no-copy", help="Copy a local source into data/raw/ and version it with DVC")] = True,
) -> None:
    """Set up a project for a data set: inspect it, choose params that suit it, git + DVC init, version the data."""
    from lensmith.projectinit import inspect_source, plan_for, write_project

    inspection = inspect_source(source, s3_endpoint_url)
    plan = plan_for(inspection, orientation)
    typer.echo(
        f"{inspection.description}: {inspection.n_images} images in {len(inspection.class_counts)} classes "
        f"({', '.join(f'{k} {v}' for k, v in inspection.class_counts.items())})"
    )
    typer.echo(
        f"  sampled {inspection.sampled}: shorter side median {inspection.median_side:g} px (min {inspection.smallest_side}), "
        f"modes {inspection.modes}, metadata columns {inspection.metadata_columns or 'none'}"
    )
    created = write_project(directory.resolve(), plan, copy_source=copy, remote=remote, s3_endpoint_url=s3_endpoint_url)
    typer.echo(f"project {created['project']} (data.source: {created['source']}); chosen:")
    for choice in plan.choices:
        typer.echo(f"  {choice.key} = {choice.value!r}  ({choice.why})")
    for warning in plan.warnings:
        typer.echo(f"note: {warning}")
    typer.echo("next:")
    typer.echo(f"  cd {directory}")
    typer.echo("  lensmith run        # validate, split, train, evaluate, export, gate, register (reports/*.html)")
    typer.echo("  lensmith serve      # the production model on http://127.0.0.1:8000/v1/predict")


@app.command()
@user_errors
def pack(
    src: Annotated[Path, typer.Argument(help="Image folder: <label>/<file> (+ optional metadata.csv)")],
    dest: Annotated[Path, typer.Argument(help="Shard folder to create, or to append new images to")],
    shard_images: Annotated[int, typer.Option(help="At most this many images per shard")] = 1000,
    shard_mb: Annotated[int, typer.Option(help="At most about this many MB per shard")] = 256,
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Pack an image folder into tar shards + an index (fast `dvc push` of many small images); point data.source at DEST.

    Packing again appends new and changed images as new shards; existing shards are never rewritten.
    """
    from lensmith.packing import pack_images

    params, _ = _context(params_file, overrides, Path("."))
    summary = pack_images(
        src, dest, extensions=params.data.image_extensions, shard_images=shard_images, shard_bytes=shard_mb * 1024 * 1024
    )
    typer.echo(str(summary))


def _check_prefect_api(on_unreachable: str) -> None:
    """With PREFECT_API_URL set, the server must answer; else fail clearly or fall back to ephemeral."""
    from lensmith.procutil import http_ok

    api = os.environ.get("PREFECT_API_URL")
    if not api or http_ok(api.rstrip("/") + "/health", timeout_s=5):
        return
    if on_unreachable == "ephemeral":
        typer.secho(f"lensmith: Prefect API {api} is unreachable; running on a temporary local server", err=True)
        os.environ.pop("PREFECT_API_URL")
        return
    raise LensmithError(
        f"Prefect API {api} is unreachable (is `make ui` / `prefect server start` running?). "
        "Unset PREFECT_API_URL to run on a temporary server, or set orchestration.on_unreachable_server=ephemeral."
    )


def _start_prefect_api() -> Callable[[], None]:
    """With no Prefect server configured, start a temporary one (lensmith.prefectserver) before the flow
    modules are imported, so that it boots while they import; it stops when this process exits. Returns
    the wait for it to answer, to call once the flow module is imported."""
    from lensmith import prefectserver

    server = prefectserver.start_if_needed()
    if server is None:
        return lambda: None
    typer.secho(f"lensmith: temporary Prefect server on {server.api_url} (set PREFECT_API_URL or run `make ui` for a lasting one)", err=True)
    return server.wait_ready


@app.command()
@user_errors
def run(
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Run the training flow (Prefect; each task reproduces its DVC stage) with optional --set overrides.

    --set values are written to params.yaml for the run (so dvc.lock records them) and restored after.
    """
    params, _ = _context(params_file, overrides, root)  # fail fast on bad params, before Prefect starts
    from tasks.pipeline import check_params_present

    check_params_present(root.resolve())  # and on a dvc.yaml / dvc.lock DVC cannot read or params it lacks
    _check_prefect_api(params.orchestration.on_unreachable_server)
    wait_for_server = _start_prefect_api()
    from flows.training import training_flow
    from tasks.runners import check_task_runner_reachable

    check_task_runner_reachable(params.orchestration)  # a plain message, while the temporary server boots
    wait_for_server()
    result = training_flow(root=str(root.resolve()), params_file=str(params_file), overrides=overrides or [])
    for stage, info in result["stages"].items():
        typer.echo(f"  {stage:<10} {'ran' if info['ran'] else 'unchanged'} ({info['seconds']:.1f}s)")
    typer.echo("reports:")
    for name, path in result["reports"].items():
        typer.echo(f"  {name:<10} {path}")
    promotion = result.get("promotion")
    if promotion:
        typer.echo(f"registry: {promotion['note']}")
        if promotion["version"] and (promotion["promoted"] or not promotion["registered"]):
            typer.echo("next: `lensmith serve` answers with the production model; `lensmith models list` shows the versions")


@app.command()
@user_errors
def nightly(params_file: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Run the nightly retraining flow once now: pull, retrain if anything changed, gate, promote, push, record."""
    params, _ = _context(params_file, None, root)
    _check_prefect_api(params.orchestration.on_unreachable_server)
    wait_for_server = _start_prefect_api()
    from flows.nightly import nightly_flow
    from tasks.runners import check_task_runner_reachable

    check_task_runner_reachable(params.orchestration)
    wait_for_server()
    result = nightly_flow(root=str(root.resolve()), params_file=str(params_file))
    typer.echo(f"nightly: {result['status']} in {result['seconds']:.1f}s")
    if result.get("decision"):
        decision = result["decision"]
        typer.echo(f"  version: {decision.get('version') or '-'}; reasons: {'; '.join(decision.get('reasons') or []) or '-'}")
    if result.get("commit"):
        typer.echo(f"  recorded as commit {result['commit']}")


@app.command()
@user_errors
def schedule(params_file: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Serve the nightly retraining (cron nightly.cron) and drift monitoring (cron drift.cron) deployments.

    Uses PREFECT_API_URL (e.g. a `make ui` server); runs until interrupted.
    """
    from flows.deployments import serve_deployments

    params, _ = _context(params_file, None, root)
    serve_deployments(params, root, str(params_file))


models_app = typer.Typer(help="The model registry: list, show, promote and roll back versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry(root: Path):  # noqa: ANN202
    from lensmith.layout import Layout
    from lensmith.registry import Registry

    return Registry(Layout(root.resolve()).models)


@models_app.command("list")
@user_errors
def models_list(root: RootOpt = Path(".")) -> None:
    """Registered versions, newest last; `*` marks production."""
    infos = _registry(root).list_versions()
    if not infos:
        typer.echo("no registered model versions")
    for info in infos:
        mark = "*" if "production" in info.aliases else " "
        shown = ", ".join(f"{k} {v:.4f}" for k, v in info.metrics.items() if isinstance(v, (int, float)))
        aliases = f" [{', '.join(info.aliases)}]" if info.aliases else ""
        typer.echo(f"{mark} {info.version}  {info.created or '?'}  {info.gate_decision or 'ungated'}  {shown}{aliases}")


@models_app.command("show")
@user_errors
def models_show(version: Annotated[str, typer.Argument(help="Version id (v0003) or alias")], root: RootOpt = Path(".")) -> None:
    """Everything stored about one version (meta, metrics, gate) as JSON."""
    import json

    typer.echo(json.dumps(_registry(root).show(version), indent=2, default=str))


@models_app.command("register")
@user_errors
def models_register(
    promote: Annotated[bool, typer.Option("--promote/--no-promote", help="Make it production when its gate passed")] = True,
    root: RootOpt = Path("."),
) -> None:
    """Register models/candidate (e.g. after `dvc repro`) with its metrics, gate decision and export; promote when the gate passed."""
    from lensmith.layout import Layout
    from lensmith.promotion import promote_if_passed

    decision = promote_if_passed(Layout(root.resolve()), promote=promote)
    typer.echo(decision.note)
    for reason in decision.reasons if not decision.passed else []:
        typer.echo(f"  - {reason}")
    if not decision.passed:
        raise typer.Exit(1)


@models_app.command("promote")
@user_errors
def models_promote(
    version: Annotated[str, typer.Argument(help="Version id (v0003) or alias")],
    allow_stale_gate: Annotated[
        bool,
        typer.Option(
            "--allow-stale-gate",
            help="Promote even though its gate compared it against another production than the current one "
            "(e.g. going back to an older version further than `rollback` does)",
        ),
    ] = False,
    root: RootOpt = Path("."),
) -> None:
    """Make VERSION production (refused when its gate rejected it, or compared it against another production:
    rerun the gate); the old production becomes previous."""
    registry = _registry(root)
    resolved = registry.version_of(version)
    registry.promote(resolved, allow_stale_gate=allow_stale_gate)
    typer.echo(f"production -> {resolved}")


@models_app.command("rollback")
@user_errors
def models_rollback(root: RootOpt = Path(".")) -> None:
    """Make the previous production version production again."""
    typer.echo(f"production -> {_registry(root).rollback()} (rolled back)")


@app.command()
@user_errors
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to bind (default: serve.host)")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: serve.port)")] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="Model folder (model.onnx, export.json) or .onnx file; default: the registry's production")
    ] = None,
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """The prediction service (FastAPI + ONNX Runtime) under /v1 with /metrics; set LENSMITH_API_TOKEN for feedback/admin."""
    import logging

    import uvicorn

    from lensmith.serve.app import create_app
    from lensmith.serve.models import PathSource, production_source

    params, layout = _context(params_file, overrides, root)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = PathSource(model.resolve()) if model is not None else production_source(layout.models)
    source.locate()  # fail here, with the reason, rather than serve nothing
    floors = {"min_positive_recall": params.gate.min_positive_recall}
    app_ = create_app(params.serve, layout.root, source, quality_floors=floors)
    uvicorn.run(app_, **uvicorn_options(params.serve, host, port))


def uvicorn_options(serve_params: Any, host: str | None, port: int | None) -> dict[str, Any]:
    """uvicorn.run's options for serve.*: beyond serve.max_connections open connections or requests uvicorn
    answers 503 itself (the service's own limits, serve.max_queue and the deadline, answer 503 with a JSON
    body and Retry-After well before that); the listen backlog is as long, idle keep-alive connections close
    after serve.keep_alive_s."""
    return {
        "host": host or serve_params.host, "port": port or serve_params.port, "log_level": "info", "server_header": False,
        "access_log": serve_params.access_log, "limit_concurrency": serve_params.max_connections,
        "backlog": serve_params.max_connections, "timeout_keep_alive": serve_params.keep_alive_s,
    }


review_app = typer.Typer(help="The review queue fed by serving: export it for labelling, import corrected labels.", no_args_is_help=True)
app.add_typer(review_app, name="review")


@review_app.command("export")
@user_errors
def review_export(
    out: Annotated[Path, typer.Option(help="Folder for review.csv and the Label Studio files")] = Path("reports/review"),
    url_prefix: Annotated[str, typer.Option(help="Prefix of image URLs in the Label Studio tasks")] = "/data/local-files/?d=",
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Write the review queue as CSV (fill in corrected_label) and a Label Studio import (tasks + labelling config)."""
    from lensmith.serve.review import export_queue

    params, layout = _context(params_file, overrides, root)
    classes = params.validate.labels or _queue_classes(layout)
    typer.echo(str(export_queue(layout.root / params.serve.review_dir, out, classes, url_prefix)))


def _queue_classes(layout) -> list[str]:  # noqa: ANN001
    import json

    meta = layout.candidate / "meta.json"
    return list(json.loads(meta.read_text())["classes"]) if meta.is_file() else []


@review_app.command("import")
@user_errors
def review_import(
    corrections: Annotated[Path, typer.Argument(help="review.csv with corrected_label filled in, or a Label Studio JSON export")],
    allow_new_labels: Annotated[bool, typer.Option(help="Accept labels the current model does not know")] = False,
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Add corrected images to the reviewed-data folder (data.reviewed_dir: <label>/<sha256>.<ext> + metadata.csv),
    then `dvc add` its label folders; conflicts are reported, nothing is overwritten."""
    from lensmith.reviewed import location_problem
    from lensmith.serve.review import import_corrections, manifest_labels, read_corrections
    from lensmith.sources import local_source_path

    params, layout = _context(params_file, overrides, root)
    reviewed = local_source_path(params.data.reviewed_dir, layout)
    problem = location_problem(reviewed, _folders_reviewed_data_must_avoid(params, layout))
    if problem:
        raise LensmithError(problem)
    classes = params.validate.labels or _queue_classes(layout)
    report = import_corrections(
        layout.root / params.serve.review_dir, read_corrections(corrections), reviewed, classes,
        manifest_labels(layout.manifest), allow_new_labels,
    )
    typer.echo(str(report))
    if report.imported:
        typer.echo(_track_reviewed_labels(layout.root, reviewed, report.labels_written))


def _folders_reviewed_data_must_avoid(params, layout) -> dict[str, Path]:  # noqa: ANN001
    """The local sources and every output of the project's pipeline stages (what a rerun may delete)."""
    from lensmith.sources import is_s3_uri, local_source_path

    folders = {
        f"data source {spec!r}": local_source_path(spec, layout)
        for spec in [params.data.source, *params.data.sources] if not is_s3_uri(spec)
    }
    if (layout.root / "dvc.yaml").is_file():
        from tasks.pipeline import resolved_pipeline

        for stage in resolved_pipeline(layout.root).values():
            if stage.name.endswith(".dvc"):  # `dvc add`ed data (the reviewed label folders among it), not a stage
                continue
            folders.update({f"the output {out!r} of stage {stage.name!r}": layout.root / out for out in stage.io.outs})
    return folders


def _track_reviewed_labels(root: Path, reviewed: Path, labels: list[str]) -> str:
    """`dvc add` each label folder the import wrote to (pointer `<label>.dvc` + .gitignore, for git and `dvc push`)."""
    if not (root / ".dvc").is_dir():
        return "not a DVC project: the reviewed images are not versioned (run `dvc init`, then `dvc add` each label folder)"
    if not reviewed.resolve().is_relative_to(root.resolve()):
        return f"{reviewed} is outside the project: not versioned by DVC"
    from tasks.dvc_runner import dvc_command

    targets = [(reviewed.resolve() / label).relative_to(root.resolve()).as_posix() for label in labels]
    proc = dvc_command(root, "add", "-q", *targets)
    if proc.returncode != 0:
        raise LensmithError(
            f"the corrections were imported, but `dvc add {' '.join(targets)}` failed: {(proc.stderr or proc.stdout).strip()[-400:]}; "
            "run it by hand before the next commit"
        )
    return f"versioned with DVC: {', '.join(f'{t}.dvc' for t in targets)} (commit them with {reviewed.name}/metadata.csv)"


@app.command()
@user_errors
def drift(
    current: Annotated[
        str, typer.Option("--current", help="Image folder, s3://bucket/prefix, or 'log' (the prediction log, serve.log_dir)")
    ],
    since: Annotated[Optional[str], typer.Option(help="Prediction-log window, e.g. 12h, 7d (default: drift.since)")] = None,
    model: Annotated[Optional[str], typer.Option(help="Registry alias/version or 'candidate' (default: drift.model)")] = None,
    where: Annotated[
        Optional[list[str]],
        typer.Option(
            "--where",
            help="Only the images whose column has this value, e.g. site=C or site=C,D (repeatable, all must hold): the "
            "prediction log's context, a folder's metadata.csv column (default: drift.where)",
        ),
    ] = None,
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Drift of a window against the model's reference (Evidently): reports/drift.{html,json}; says retrain or keep."""
    from lensmith.drift.report import run_drift

    params, layout = _context(params_file, overrides, root)
    typer.echo(str(run_drift(params, layout, current, since=since, model=model, where=where or None)))


@app.command()
@user_errors
def finetune(
    site: Annotated[str, typer.Option("--site", help="Site name (value of drift.finetune.site_column)")],
    source: Annotated[
        Optional[str], typer.Option(help="Labelled folder/s3 prefix of the site's images (default: manifest rows of the site)")
    ] = None,
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    root: RootOpt = Path("."),
) -> None:
    """Fine-tune production on one site's images, evaluate (site + global test), gate and register a site version."""
    from lensmith.finetune import run_finetune

    params, layout = _context(params_file, overrides, root)
    typer.echo(str(run_finetune(params, layout, site, source)))


@app.command("check-params")
@user_errors
def check_params(
    params_file: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the reference of every key (docs/params.md) instead")] = False,
) -> None:
    """Validate params.yaml (and --set overrides) and print the effective configuration."""
    import yaml

    if markdown:
        from lensmith.paramsdoc import params_markdown

        typer.echo(params_markdown(), nl=False)
        return

    params, _ = _context(params_file, overrides, Path("."))
    typer.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover - `python -m lensmith.cli`
    main()
