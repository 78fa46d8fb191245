"""Run one stage against a project stored at an fsspec URI (`s3://bucket/project`, `file:///...`).

What lets a worker on another machine run a task without a shared disk: the stage's deps (dvc.yaml
as DVC resolves it against the params: `tasks.pipeline.stage_io`) are read from the URI into a local scratch
project, the stage runs there in-process (`lensmith.stages.run_stage`), and its outs, metrics and
plots are written back to the URI, each file atomically: uploaded to a temporary key, its size checked,
then moved onto its final key (readers see the old object or the new one, never a partial one).

The flow machine's side (`orchestration.artifact_store`, tasks/store_stages.py) uses the rest: `send_inputs` uploads
the data deps the store lacks or holds in another version (size and md5 against the ETag), `fetch_outputs`
downloads the outs back into the project (each file to a temporary name, size checked, renamed), and
`remove_temporary_keys` deletes the temporary keys of a worker that died mid-upload.

Code deps (`lensmith/...`) are not data: the worker runs its own installed copy. The S3 endpoint comes
from `data.s3_endpoint_url` or the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL),
credentials from the AWS environment or profile.
"""

from __future__ import annotations

import hashlib
import os
import re
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
TEMPORARY_MARK = ".tmp-"  # in the key of an upload not yet moved onto its final key


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
    worker: WorkerIdentity | None = None

    def __str__(self) -> str:
        where = f" on {self.worker}" if self.worker else ""
        return f"{self.stage} at {self.project_uri}{where}: read {len(self.downloaded)} file(s), wrote {len(self.uploaded)}; {self.summary}"


@dataclass(frozen=True)
class WorkerIdentity:
    """Where a remote stage ran: host, process, working directory and its scratch project."""

    host: str
    pid: int
    cwd: str
    scratch: str

    def __str__(self) -> str:
        return f"host {self.host} pid {self.pid} cwd {self.cwd} scratch {self.scratch}"


def worker_identity(scratch: Path) -> WorkerIdentity:
    import socket

    return WorkerIdentity(socket.gethostname(), os.getpid(), os.getcwd(), str(scratch))


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
    temporary = f"{remote}{TEMPORARY_MARK}{uuid.uuid4().hex[:12]}"
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
    return RemoteStageResult(stage, project_uri, downloaded, uploaded, str(summary), worker_identity(scratch))


# ---- the flow machine's side: the project <-> the store -------------------------------------------------------


def is_local_path(rel: str) -> bool:
    """A project-relative path (not a URL dep such as an s3:// data.source, which the worker reads itself)."""
    return "://" not in rel and not Path(rel).is_absolute()


def local_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a content fingerprint, compared with S3's ETag
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stored_md5(fs: Any, remote: str, info: dict[str, Any]) -> str:
    """The stored object's md5: its ETag when that is one (a single-part S3 upload), else hashed by reading it."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        return etag
    digest = hashlib.md5()  # noqa: S324
    with fs.open(remote, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stored_files(fs: Any, base: str, rel: str) -> dict[str, dict[str, Any]]:
    """Project-relative file -> its info, for the files the store holds at `rel` (a file or a folder)."""
    remote = f"{base}/{rel}"
    if fs.isfile(remote):
        return {rel: fs.info(remote)}
    if not fs.isdir(remote):
        return {}
    return {path[len(base) + 1 :]: info for path, info in fs.find(remote, detail=True).items()}


def local_files(root: Path, rel: str) -> list[str]:
    """Project-relative files at `rel` (itself if a file, everything under it if a folder)."""
    path = root / rel
    if path.is_file():
        return [rel]
    return sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def holds_same_version(fs: Any, base: str, root: Path, rel_file: str, info: dict[str, Any] | None) -> bool:
    local = root / rel_file
    return info is not None and int(info.get("size", -1)) == local.stat().st_size and stored_md5(fs, f"{base}/{rel_file}", info) == local_md5(local)


def send_to_store(fs: Any, base: str, root: Path, rel: str) -> list[str]:
    """Make the store hold the project's version of `rel`: upload (atomically) the files it lacks or holds in another
    version, remove the files it holds under a folder `rel` that the project does not; the files uploaded."""
    stored = stored_files(fs, base, rel)
    files = local_files(root, rel)
    sent = [f for f in files if not holds_same_version(fs, base, root, f, stored.get(f))]
    for rel_file in sent:
        upload_atomic(fs, root / rel_file, f"{base}/{rel_file}")
    for stale in set(stored) - set(files):
        fs.rm(f"{base}/{stale}")
    return sent


def send_inputs(fs: Any, base: str, root: Path, stage: str, io: StageIO) -> list[str]:
    """Everything the stage reads that the store lacks or holds in another version: its data deps (never code: the
    worker runs its own installed copy), its persisted outs and, for a stage that reads images, the images the
    project's splits list."""
    rels = [rel for rel in dict.fromkeys(io.deps + io.persist) if is_local_path(rel) and not is_code(rel)]
    if stage_named(stage).reads_images:
        rels += split_images(Layout(root))
    return [f for rel in dict.fromkeys(rels) for f in send_to_store(fs, base, root, rel)]


def download_atomic(fs: Any, remote: str, local: Path) -> None:
    """Download to a temporary file beside `local`, check its size, then rename it onto `local`."""
    local.parent.mkdir(parents=True, exist_ok=True)
    temporary = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        fs.get_file(remote, str(temporary))
        if temporary.stat().st_size != fs.size(remote):
            raise RemoteStageError(f"download of {remote} to {temporary} is {temporary.stat().st_size} bytes, expected {fs.size(remote)}")
        os.replace(temporary, local)
    finally:
        temporary.unlink(missing_ok=True)


def fetch_outputs(fs: Any, base: str, root: Path, outs: list[str]) -> list[str]:
    """Download the stage's outs from the store into the project, each file atomically; files of a folder out that
    the store no longer holds are removed. The files downloaded."""
    fs.invalidate_cache()
    fetched = []
    for rel in outs:
        stored = stored_files(fs, base, rel)
        if not stored:
            raise RemoteStageError(f"the store holds no {rel} (an output of the stage) at {base}/{rel}")
        for rel_file in sorted(stored):
            download_atomic(fs, f"{base}/{rel_file}", root / rel_file)
        for stale in set(local_files(root, rel)) - set(stored):
            (root / stale).unlink()
        fetched += sorted(stored)
    return fetched


def remove_temporary_keys(fs: Any, base: str, rels: list[str]) -> list[str]:
    """Delete the temporary upload keys left at `rels` by a writer that died mid-upload; the keys removed."""
    fs.invalidate_cache()
    leftovers = []
    for rel in rels:
        parent = f"{base}/{rel}".rsplit("/", 1)[0]
        if fs.isdir(parent):
            leftovers += [path for path in fs.find(parent) if TEMPORARY_MARK in path.rsplit("/", 1)[-1] and path[len(base) + 1 :].startswith(rel)]
    for path in dict.fromkeys(leftovers):
        fs.rm(path)
    return list(dict.fromkeys(leftovers))
