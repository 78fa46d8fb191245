"""The pipeline as DVC resolves it (`${...}` templating, foreach, the graph from deps and outs): the flow's graph,
each stage's inputs and outputs for a remote worker, and the git-tracked outputs a nightly run records.

No second parser of dvc.yaml: everything here comes from DVC's own index of the project.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lensmith.errors import LensmithError
from lensmith.params import Params
from lensmith.remote import StageIO


class PipelineError(LensmithError):
    """dvc.yaml (or the params it refers to) cannot be resolved into a stage graph."""


@dataclass(frozen=True)
class ResolvedStage:
    name: str
    upstream: tuple[str, ...]  # stages whose outputs this stage depends on
    io: StageIO
    git_tracked: tuple[str, ...]  # outputs with `cache: false` (metrics, plots): versioned by git, not DVC
    params: tuple[tuple[str, str], ...] = ()  # (params file, dotted key) the stage tracks


def resolved_pipeline(root: Path) -> dict[str, ResolvedStage]:
    """Every stage of `root`'s dvc.yaml, resolved by DVC (project-relative paths), in dvc.yaml order."""
    from dvc.dependency.param import ParamsDependency
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        with contextlib.chdir(root), Repo(str(root), uninitialized=True) as repo:
            index = repo.index
            # dvc.yaml's stages; a `dvc add`ed folder's .dvc file (the reviewed corrections) is data, not a step
            stages = [stage for stage in index.stages if isinstance(stage, PipelineStage)]
            upstream: dict[str, list[str]] = {stage.addressing: [] for stage in stages}
            for stage, dependency in index.graph.edges:
                if stage.addressing in upstream and dependency.addressing in upstream:
                    upstream[stage.addressing].append(dependency.addressing)
            resolved = {}
            for stage in stages:
                outs = [str(out.def_path) for out in stage.outs]
                resolved[stage.addressing] = ResolvedStage(
                    name=stage.addressing,
                    upstream=tuple(sorted(upstream[stage.addressing])),
                    io=StageIO(
                        # params are the params object's, not a file the stage reads
                        deps=[str(dep.def_path) for dep in stage.deps if not isinstance(dep, ParamsDependency)],
                        outs=outs,
                        persist=[str(out.def_path) for out in stage.outs if out.persist],
                    ),
                    git_tracked=tuple(str(out.def_path) for out in stage.outs if not out.use_cache),
                    params=tuple((str(dep.def_path), str(key)) for dep in stage.deps
                                 if isinstance(dep, ParamsDependency) for key in (dep.params or [])),
                )
    except DvcException as exc:
        raise PipelineError(f"the pipeline of {root} cannot be read (dvc.yaml, dvc.lock and the params they use): {exc}") from None
    if not resolved:
        raise PipelineError(f"{root / 'dvc.yaml'} declares no stages")
    return resolved


def missing_params(root: Path) -> list[str]:
    """`stage: file key` for every params key dvc.yaml tracks that its params file lacks (DVC would stop the stage
    only when it gets there; Lensmith's own defaults do not count for DVC)."""
    import yaml

    missing = []
    for stage in resolved_pipeline(root).values():
        for file, key in stage.params:
            try:
                node: Any = yaml.safe_load((root / file).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                node = None
            for part in key.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING:
                missing.append(f"{stage.name}: {file} {key}")
    return missing


_MISSING = object()


def check_params_present(root: Path) -> None:
    """A PipelineError naming every tracked params key the params file lacks, with how to fill it in."""
    missing = missing_params(root)
    if missing:
        raise PipelineError(
            "dvc.yaml tracks params that params.yaml does not have (DVC needs them written out, defaults are not "
            f"enough): {'; '.join(missing)}. Add them; `lensmith check-params` prints every effective value"
        )


def flow_graph(root: Path) -> dict[str, tuple[str, ...]]:
    """stage -> upstream stages, from DVC's graph of the project's dvc.yaml: the flow runs what `dvc repro` would
    (a project made by `lensmith init` has no demo stage; a project's own stages run too)."""
    return {name: stage.upstream for name, stage in resolved_pipeline(root).items()}


def git_versioned_outputs(root: Path) -> list[str]:
    """What git versions of the stages' outputs: metrics and plots with `cache: false`, and the .gitignore files
    DVC writes beside the outputs it caches; in dvc.yaml order."""
    paths: list[str] = []
    for stage in resolved_pipeline(root).values():
        cached = [out for out in stage.io.outs if out not in stage.git_tracked]
        paths += [(Path(out).parent / ".gitignore").as_posix() for out in cached] + list(stage.git_tracked)
    return list(dict.fromkeys(paths))


def stage_io(stage: str, params: Params, dvc_yaml: Path) -> StageIO:
    """`stage`'s deps and everything it writes, as DVC resolves `dvc_yaml` against `params` (not a params file:
    a remote worker holds the params object, overrides included)."""
    with tempfile.TemporaryDirectory(prefix="lensmith-pipeline-") as scratch:
        root = Path(scratch)
        (root / "dvc.yaml").write_bytes(dvc_yaml.read_bytes())
        (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        pipeline = resolved_pipeline(root)
    if stage not in pipeline:
        raise PipelineError(f"unknown stage {stage!r}; {dvc_yaml} declares: {', '.join(pipeline)}")
    return pipeline[stage].io
