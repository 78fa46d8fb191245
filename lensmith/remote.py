"""Run one stage against a project stored at an fsspec URI (`s3://bucket/project`, `file:///...`).

What lets a worker on another machine run a task without a shared disk: the stage's deps (dvc.yaml
as DVC resolves it against the params: `tasks.pipeline.stage_io`) are read from the URI into a local scratch
project, the stage runs there in-process (`lensmith.stages.run_stage`), and its outs, metrics and
plots are written back to the URI, each file atomically: uploaded to a temporary key, its size checked,
then moved onto its final key (readers see the old object or the new one, never a partial one).

Code deps (`lensmith/...`) are not data: the worker runs its own installed copy. The S3 endpoint comes
from `data.s3_endpoint_url` or the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL),
credentials from the AWS environment or profile.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lensmith.errors import LensmithError
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.params import Params
from lensmith.stages import stage_named

CODE_PREFIXES: tuple[str, ...] = ("lensmith/",)


class RemoteStageError(LensmithError):
    """A remote stage's input is missing, or an output could not be written back."""


@dataclass(frozen=True)
class StageIO:
    deps: list[str]
    outs: list[str]  # outs + metrics + plots: everything the stage writes
    persist: list[str] = field(default_factory=list)  # outs the stage updates in place (read before running)


@dataclass
class RemoteStageResult:
    stage: str
    project_uri: str
    downloaded: list[str]
    uploaded: list[str]
    summary: str

    def __str__(self) -> str:
        return f"{self.stage} at {self.project_uri}: read {len(self.downloaded)} file(s), wrote {len(self.uploaded)}; {self.summary}"


def is_code(path: str) -> bool:
    return path.startswith(CODE_PREFIXES)


# ---- storage ------------------------------------------------------------------------------------------------


def storage_options(uri: str, params: Params) -> dict[str, Any]:
    """fsspec options: for s3://, the endpoint from params, else from the AWS environment."""
    if not uri.startswith("s3://"):
        return {}
    endpoint = params.data.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def open_project(project_uri: str, params: Params) -> tuple[Any, str]:
    """(filesystem, base path without protocol) for the project at `project_uri`."""
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(project_uri.rstrip("/"), **storage_options(project_uri, params))
    fs.invalidate_cache()
    return fs, base.rstrip("/")


def remote_files(fs: Any, remote: str) -> list[str]:
    """Files at `remote` (itself if a file, everything under it if a folder), as full remote paths."""
    if fs.isfile(remote):
        return [remote]
    return sorted(fs.find(remote)) if fs.isdir(remote) else []


def download(fs: Any, base: str, rel: str, scratch: Path) -> list[str]:
    got = []
    for remote in remote_files(fs, f"{base}/{rel}"):
        rel_file = remote[len(base) + 1 :]
        local = scratch / rel_file
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
        got.append(rel_file)
    return got


def upload_atomic(fs: Any, local: Path, remote: str) -> None:
    """Upload to a temporary key, check its size, then move it onto `remote`."""
    temporary = f"{remote}.tmp-{uuid.uuid4().hex[:12]}"
    fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
    try:
        fs.put_file(str(local), temporary)
        size = fs.size(temporary)
        if size != local.stat().st_size:
            raise RemoteStageError(f"upload of {local} to {temporary} is {size} bytes, expected {local.stat().st_size}")
        fs.mv(temporary, remote)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def upload(fs: Any, base: str, rel: str, scratch: Path) -> list[str]:
    """Write one out back: its files atomically, then drop remote files the folder no longer holds."""
    local = scratch / rel
    if not local.exists():
        raise RemoteStageError(f"the stage did not write its declared output {rel}")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    written = []
    for path in files:
        rel_file = path.relative_to(scratch).as_posix()
        upload_atomic(fs, path, f"{base}/{rel_file}")
        written.append(rel_file)
    if local.is_dir():
        fs.invalidate_cache()
        keep = {f"{base}/{r}" for r in written}
        for stale in set(remote_files(fs, f"{base}/{rel}")) - keep:
            fs.rm(stale)
    return written


# ---- the stage ---------------------------------------------------------------------------------------------


def split_images(layout: Layout) -> list[str]:
    """Project-relative image files the local splits list (absolute paths are the worker's own)."""
    files: set[str] = set()
    for name in SPLIT_NAMES:
        if layout.split_file(name).is_file():
            files.update(f for f in pd.read_parquet(layout.split_file(name), columns=["file"])["file"].astype(str) if not Path(f).is_absolute())
    return sorted(files)


def fetch_inputs(fs: Any, base: str, io: StageIO, stage: str, scratch: Path, project_uri: str) -> list[str]:
    downloaded = []
    for rel in dict.fromkeys(io.deps + io.persist):
        got = download(fs, base, rel, scratch)
        if not got and not is_code(rel) and rel not in io.persist:
            raise RemoteStageError(f"stage {stage!r} needs {rel}, which is not at {project_uri}/{rel}")
        downloaded += got
    if stage_named(stage).reads_images:
        for rel in split_images(Layout(scratch)):
            if not (scratch / rel).is_file():
                downloaded += download(fs, base, rel, scratch)
    return downloaded


def run_stage_at(stage: str, project_uri: str, params: Params, scratch: Path, io: StageIO) -> RemoteStageResult:
    """Read the stage's inputs (`io`, from `tasks.pipeline.stage_io`) from `project_uri`, run it in `scratch`,
    write its outputs back to `project_uri`."""
    from lensmith.stages import run_stage

    fs, base = open_project(project_uri, params)
    scratch.mkdir(parents=True, exist_ok=True)
    downloaded = fetch_inputs(fs, base, io, stage, scratch, project_uri)
    summary = run_stage(stage, params, Layout(scratch))
    uploaded = [f for rel in io.outs for f in upload(fs, base, rel, scratch)]
    return RemoteStageResult(stage, project_uri, downloaded, uploaded, str(summary))
