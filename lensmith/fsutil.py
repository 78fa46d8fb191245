"""Crash-safe file writes: write to a temporary file beside the target, then rename over it.

Durability: the temporary file is fsynced before the rename and the parent directory after it, so after a
power loss the target holds either the old or the new complete content (never an empty or half file, which
a rename alone allows on ext4/xfs: the rename can reach the disk before the data).

Permissions: mkstemp makes 0600 files; outputs get 0666 minus the umask, like any file the process creates.
The umask is read without changing it (`current_umask`): os.umask() can only be read by setting it, and
setting it to 0 even for an instant lets any other thread create a world-writable file meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from functools import lru_cache
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` atomically.

    On error the temporary file is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get normal file permissions
            fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- fsync -------------------------------------------------------------------------------------------

# fsync on a directory is refused by some filesystems (and by some network mounts); the data is then as
# durable as that filesystem makes it, and the write itself still succeeds
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM}


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (whoever wrote it: pandas, shutil, ...)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and directory under `folder` (and `folder` itself), before it is renamed into place."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(Path(folder))


# ---- umask -------------------------------------------------------------------------------------------

_UMASK_LINE = re.compile(r"^Umask:\s*([0-7]+)\s*$", re.MULTILINE)


def current_umask() -> int:
    """The process umask, read without changing it.

    Linux (4.7+) reports it in /proc/self/status (`Umask:`), read on every call so a later os.umask() is seen.
    Elsewhere it is measured once by creating a probe file with mode 0666 and reading the mode the kernel gave
    it (cached: a umask changed afterwards is not seen there)."""
    try:
        match = _UMASK_LINE.search(Path("/proc/self/status").read_text(encoding="ascii", errors="replace"))
    except OSError:
        match = None
    return int(match.group(1), 8) if match else _probed_umask()


@lru_cache(maxsize=1)
def _probed_umask() -> int:
    with tempfile.TemporaryDirectory(prefix="lensmith-umask-") as folder:
        probe = Path(folder) / "probe"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return 0o666 & ~stat.S_IMODE(probe.stat().st_mode)


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: Path, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet_atomic(target: Path, frame: pd.DataFrame) -> None:
    with atomic_path(target, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv_atomic(target: Path, frame: pd.DataFrame) -> None:
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


@contextmanager
def atomic_dir(target: Path, *, fsync_files: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` (old contents removed last).

    Its files are fsynced before the swap (`fsync_files=False` for bulk data that can be regenerated, where
    one fsync per file costs more than it is worth) and the parent directory after it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if fsync_files:
            fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
