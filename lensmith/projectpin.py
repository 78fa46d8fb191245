"""Which project a deployed flow may run: `root` and `params_file` are flow-run parameters, so anyone who can reach
the Prefect API could point a worker at another dvc.yaml (whose commands the worker would run). A worker pins its
project in the environment and every deployed flow checks its parameters against the pin before doing anything.

LENSMITH_ROOT (set by `lensmith schedule`, and by prefect.yaml's pull step on work-pool workers) and
LENSMITH_ALLOWED_ROOTS (extra roots, separated by os.pathsep) name the allowed project folders; with neither set,
nothing is pinned (a developer's own machine). params_file must stay inside the project folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lensmith.errors import LensmithError

ROOT_ENV = "LENSMITH_ROOT"
ALLOWED_ROOTS_ENV = "LENSMITH_ALLOWED_ROOTS"


class ProjectNotAllowedError(LensmithError):
    """A flow run asked for a project folder or params file outside what this worker is pinned to."""

    exit_code = 2


def allowed_roots(environ: Mapping[str, str]) -> list[Path]:
    """The project folders this worker may run, resolved; empty when nothing is pinned."""
    named = [environ.get(ROOT_ENV, ""), *environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep)]
    return [Path(p).expanduser().resolve() for p in named if p.strip()]


def pinned_project(root: str, params_file: str, environ: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """(project root, params file), both resolved, after checking them against the worker's pin."""
    env = os.environ if environ is None else environ
    resolved_root = Path(root).expanduser().resolve()
    allowed = allowed_roots(env)
    if allowed and resolved_root not in allowed:
        raise ProjectNotAllowedError(
            f"project {resolved_root} is not one this worker runs ({ROOT_ENV}/{ALLOWED_ROOTS_ENV}: "
            f"{', '.join(map(str, allowed))}); a flow run's `root` parameter cannot choose another project"
        )
    params_path = (resolved_root / params_file).resolve()
    if not params_path.is_relative_to(resolved_root):
        raise ProjectNotAllowedError(f"params_file {params_file!r} is outside the project {resolved_root}")
    return resolved_root, params_path
