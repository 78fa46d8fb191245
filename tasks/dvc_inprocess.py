"""`dvc repro --single-item STAGE` with the stage's command run in this process.

DVC still decides whether the stage is stale (deps, params, outs, command), restores it from the run cache
when it can, and records dvc.lock and the run cache afterwards, exactly as `dvc repro` does; only the
command itself is replaced by the in-process stage function it would have called. That saves the
interpreter start-up and the torch/torchvision/sklearn imports (~5-9 s on 2 cores) of every stage.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lensmith.stages import STAGE_TABLE
from tasks.dvc_runner import StageFailedError, StageOutcome

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import Stage

# DVC repo objects are not thread-safe and dvc.lock is one file: one DVC operation at a time in this process.
_DVC_LOCK = threading.Lock()


def runs_lensmith_stage(cmd: str | list[str] | None, stage: str) -> bool:
    """Whether dvc.yaml's `cmd` is exactly the stage table's stock command (only then is the stage function
    equivalent); False for a stage the table does not know (a project's own stage runs its command as written)."""
    entry = STAGE_TABLE.get(stage)
    return entry is not None and isinstance(cmd, str) and shlex.split(cmd) == entry.stock_command()


@contextlib.contextmanager
def _repo_operation(repo: Repo, stage_name: str) -> Iterator[None]:
    """DVC's repo lock (other dvc processes wait or fail clearly), with DVC errors named after the stage."""
    from dvc.exceptions import DvcException
    from dvc.repo import lock_repo

    with _DVC_LOCK:
        try:
            # DVC resolves some paths against the working directory, as if `dvc` were typed in the project
            with contextlib.chdir(repo.root_dir), lock_repo(repo):
                yield
        except DvcException as exc:
            raise StageFailedError(f"stage {stage_name!r} failed (dvc): {exc}") from None


def _load_stage(repo: Repo, stage_name: str) -> Stage:
    return repo.stage.get_target(stage_name)


def _prepare(repo: Repo, stage_name: str) -> tuple[str, Stage]:
    """What to do for the stage, and the stage: "unchanged", "custom" (dvc.yaml's command is not the stock
    `lensmith STAGE`, so it must run as written), "restored" (outputs came from the run cache) or "run"."""
    from dvc.stage.cache import RunCacheNotFoundError

    with _repo_operation(repo, stage_name):
        stage = _load_stage(repo, stage_name)
        if not stage.changed():
            return "unchanged", stage
        if not runs_lensmith_stage(stage.cmd, stage_name):
            return "custom", stage
        stage.remove_outs(ignore_remove=False, force=False)
        try:
            repo.stage_cache.restore(stage)
            return "restored", stage
        except RunCacheNotFoundError:
            stage.save_deps()
            return "run", stage


def _record(repo: Repo, stage: Stage) -> None:
    """Hash the outputs into the cache, save the run cache and write the stage's dvc.lock entry (the same
    stage object from _prepare to here, as in `dvc repro`: dvc.yaml is parsed once per task)."""
    with _repo_operation(repo, stage.name):
        stage.save()
        stage.commit()
        stage.dump(update_pipeline=False)


def reproduce_in_process(root: Path, stage_name: str, run: Callable[[], Any]) -> StageOutcome | None:
    """Run `run` (the stage function) only when DVC finds the stage stale, then record it like `dvc repro`.

    None when dvc.yaml's command for the stage is not the stock `lensmith STAGE`: the caller then runs
    `dvc repro --single-item STAGE`, which runs the command as written."""
    from dvc.repo import Repo

    start = time.perf_counter()
    # wait for DVC's repo lock (`dvc --wait-for-lock`): stages on other Dask workers record theirs side by side
    with Repo(str(root), _wait_for_lock=True) as repo:
        action, stage = _prepare(repo, stage_name)
        if action == "unchanged":
            return StageOutcome(stage_name, False, time.perf_counter() - start, f"Stage '{stage_name}' didn't change, skipping")
        if action == "custom":
            return None
        checked = time.perf_counter()
        summary = "restored from the DVC run cache" if action == "restored" else str(run())
        ran = time.perf_counter()
        _record(repo, stage)
    end = time.perf_counter()
    timing = f"DVC check {checked - start:.1f}s, stage {ran - checked:.1f}s, DVC record {end - ran:.1f}s"
    return StageOutcome(stage_name, True, end - start, f"{summary}\n{timing}")
