"""Packing an image folder into shards (`lensmith pack`): immutable tar shards plus the index that
lensmith.shards reads. See lensmith/shards.py for the format.

Packing again after new images arrive writes new shards and a new index, never touches an existing shard,
so DVC only uploads what is new. Tar headers are fixed (mtime 0, uid/gid 0, mode 0644, members in path
order), so packing the same images gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lensmith.errors import DataError
from lensmith.fsutil import atomic_path, file_sha256, write_bytes_atomic, write_parquet_atomic
from lensmith.shards import INDEX_COLUMNS, INDEX_FILE, METADATA_FILE, is_shard_folder, read_shard_index
from lensmith.sources import list_image_folder

SHARD_NAME = re.compile(r"shard-(\d{5,})\.tar")
DEFAULT_SHARD_IMAGES = 1000
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
TAR_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class PackMember:
    path: str  # POSIX path inside the shard, relative to the packed folder (<label>/<file>)
    file: Path
    size: int


@dataclass
class PackSummary:
    dest: Path
    new_shards: list[Path] = field(default_factory=list)
    n_added: int = 0
    n_updated: int = 0
    n_unchanged: int = 0
    n_absent: int = 0  # in the index but no longer in the source: kept (the index only grows)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) the folder listing rejected
    bytes_written: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        shards = ", ".join(p.name for p in self.new_shards) or "none"
        lines = [
            f"pack: {self.n_added} new and {self.n_updated} changed images -> {len(self.new_shards)} new shard(s) "
            f"({self.bytes_written / 1e6:.1f} MB) in {self.dest} in {self.seconds:.1f} s",
            f"  new shards: {shards}",
            f"  unchanged (already packed) {self.n_unchanged}, in the index but gone from the source {self.n_absent}",
            f"  index: {self.dest / INDEX_FILE}",
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more skipped")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- writing


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.tar"


def next_shard_number(index: pd.DataFrame) -> int:
    numbers = [int(m.group(1)) for m in (SHARD_NAME.fullmatch(str(s)) for s in index["shard"].unique()) if m]
    return max(numbers, default=-1) + 1


def member_tarinfo(path: str, size: int) -> tarfile.TarInfo:
    """A header with nothing machine- or time-dependent in it."""
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(target: Path, members: Sequence[PackMember]) -> list[dict[str, object]]:
    """Write one tar shard atomically; return its index rows (offset of each member's data)."""
    rows: list[dict[str, object]] = []
    with atomic_path(target, suffix=".tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
            for member in members:
                data = member.file.read_bytes()
                tar.addfile(member_tarinfo(member.path, len(data)), io.BytesIO(data))
                # addfile leaves tar.offset after the data padded to a whole block
                offset = tar.offset - math.ceil(len(data) / TAR_BLOCK) * TAR_BLOCK
                sha = hashlib.sha256(data).hexdigest()
                rows.append({"path": member.path, "shard": target.name, "offset": offset, "size": len(data), "sha256": sha})
    return rows


def plan_shards(members: Sequence[PackMember], max_images: int, max_bytes: int) -> list[list[PackMember]]:
    """Consecutive groups of at most `max_images` members and about `max_bytes` (a bigger image gets its own)."""
    shards: list[list[PackMember]] = []
    current: list[PackMember] = []
    current_bytes = 0
    for member in members:
        if current and (len(current) >= max_images or current_bytes + member.size > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(member)
        current_bytes += member.size
    if current:
        shards.append(current)
    return shards


def pack_candidates(src: Path, extensions: set[str]) -> tuple[list[PackMember], list[tuple[str, str]]]:
    """Images of the ImageFolder `src` in path order, and (path, reason) for entries its listing refused."""
    listing = list_image_folder(src, extensions)
    members = sorted((PackMember(item.path, item.local_file, item.size) for item in listing.items), key=lambda m: m.path)
    return members, [(r.path, f"{r.reason}: {r.detail}") for r in listing.rejections]


def changed_members(candidates: Sequence[PackMember], index: pd.DataFrame) -> tuple[list[PackMember], int, int]:
    """(members to write, how many are updates of an indexed path, how many are already packed as they are)."""
    packed = dict(zip(index["path"].astype(str), index["sha256"].astype(str)))
    to_write, n_updated, n_unchanged = [], 0, 0
    for member in candidates:
        sha = packed.get(member.path)
        if sha is None:
            to_write.append(member)
        elif file_sha256(member.file) == sha:
            n_unchanged += 1
        else:
            to_write.append(member)
            n_updated += 1
    return to_write, n_updated, n_unchanged


def merged_index(old: pd.DataFrame, new_rows: list[dict[str, object]]) -> pd.DataFrame:
    """Old rows plus new ones; a re-packed path points at its newest copy."""
    new = pd.DataFrame(new_rows, columns=list(INDEX_COLUMNS))
    frame = pd.concat([old[~old["path"].isin(new["path"])], new], ignore_index=True) if len(old) else new
    return frame.astype({"offset": "int64", "size": "int64"}).sort_values("path", kind="stable").reset_index(drop=True)


def empty_index() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("offset", "size") else "object") for c in INDEX_COLUMNS})


def pack_images(
    src: Path,
    dest: Path,
    *,
    extensions: Sequence[str],
    shard_images: int = DEFAULT_SHARD_IMAGES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> PackSummary:
    """Pack the ImageFolder `src` (+ metadata.csv) into shards in `dest`, appending to what `dest` holds.

    Existing shards are never rewritten; new and changed images go to new shards, then the index is
    replaced (atomically, last), so a crash leaves the previous index and its shards valid.
    """
    src, dest = Path(src), Path(dest)
    if shard_images < 1 or shard_bytes < 1:
        raise DataError(f"shard size must be positive (images {shard_images}, bytes {shard_bytes})")
    if not src.is_dir():
        raise DataError(f"{src} is not a folder of <label>/<file> images")
    if is_shard_folder(src):
        raise DataError(f"{src} is already a shard folder (it has {INDEX_FILE}); pack the image folder instead")
    started = time.perf_counter()
    old = read_shard_index(dest) if is_shard_folder(dest) else empty_index()
    candidates, skipped = pack_candidates(src, {e.lower() for e in extensions})
    to_write, n_updated, n_unchanged = changed_members(candidates, old)
    summary = PackSummary(
        dest=dest, n_added=len(to_write) - n_updated, n_updated=n_updated, n_unchanged=n_unchanged, skipped=skipped
    )
    summary.n_absent = int((~old["path"].isin([m.path for m in candidates])).sum())
    rows: list[dict[str, object]] = []
    number = next_shard_number(old)
    for group in plan_shards(to_write, shard_images, shard_bytes):
        target = dest / shard_name(number)
        rows += write_shard(target, group)
        summary.new_shards.append(target)
        summary.bytes_written += target.stat().st_size
        number += 1
    metadata = src / METADATA_FILE
    if metadata.is_file():
        write_bytes_atomic(dest / METADATA_FILE, metadata.read_bytes())
    if rows or not is_shard_folder(dest):
        write_parquet_atomic(dest / INDEX_FILE, merged_index(old, rows))
    summary.seconds = time.perf_counter() - started
    return summary
