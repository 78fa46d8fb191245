"""Image shards: many small images packed into a few plain POSIX tar files, read in place.

Pushing 10,000 small JPEGs to S3 with `dvc push` costs one request per file; a few tar shards push
in a fraction of the time (see README, "Many small images: shards"). A shard folder holds

    shard-00000.tar, shard-00001.tar, ...   uncompressed tar, members `<label>/<...>/<file>`
    shard-index.parquet                    member path -> shard, offset of its data, size, sha256
    metadata.csv                           copied from the packed folder when it has one

Shards are immutable: packing again after new images arrive writes new shards and a new index,
never touches an existing shard, so DVC only uploads what is new. Tar headers are fixed (mtime 0,
uid/gid 0, mode 0644, members in path order), so packing the same images gives identical bytes.
Reading one image is a seek and a read of `size` bytes (no tar scan); `ImageRef` says where an
image's bytes are, and `read_image_bytes` is the one function every stage reads image bytes with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lensmith.errors import DataError, ImageRejected
from lensmith.fsutil import file_sha256

INDEX_FILE = "shard-index.parquet"
METADATA_FILE = "metadata.csv"
INDEX_COLUMNS: tuple[str, ...] = ("path", "shard", "offset", "size", "sha256")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a whole file, or `size` bytes at `offset` inside a shard `file`."""

    file: Path
    offset: int | None = None
    size: int | None = None
    member: str | None = None  # the member's path, for messages only

    @property
    def in_shard(self) -> bool:
        return self.offset is not None

    @property
    def name(self) -> str:
        """What to show a person: the member path inside a shard, else the file."""
        return self.member if self.in_shard and self.member else str(self.file)

    def __str__(self) -> str:
        if not self.in_shard:
            return str(self.file)
        return f"{self.file} member {self.member or '?'} (offset {self.offset}, {self.size} bytes)"


# ---------------------------------------------------------------------------------------------- reading


def is_shard_folder(path: Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def read_shard_index(folder: Path) -> pd.DataFrame:
    """The index of a shard folder (columns INDEX_COLUMNS); a DataError names an unreadable one."""
    path = Path(folder) / INDEX_FILE
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{folder} has no shard index {INDEX_FILE}; create one with `lensmith pack`") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise DataError(
            f"shard index {path} is not readable parquet ({type(exc).__name__}: {exc}); re-run `lensmith pack`"
        ) from None
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"shard index {path} lacks column(s) {missing}; re-run `lensmith pack`")
    return frame[list(INDEX_COLUMNS)].astype({"offset": "int64", "size": "int64"})


def read_image_bytes(ref: ImageRef | Path | str, *, sha256: str | None = None) -> bytes:
    """The bytes of one image. A shard member is one seek + read; a short read or (when `sha256` is
    given) a different hash raises ImageRejected naming the shard and member. A missing file raises
    FileNotFoundError, as for a plain file."""
    if not isinstance(ref, ImageRef):
        ref = ImageRef(Path(ref))
    if not ref.in_shard:
        data = ref.file.read_bytes()
    else:
        data = read_member(ref)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ImageRejected("corrupt_shard_member" if ref.in_shard else "changed_file", f"{ref}: sha256 differs from the index")
    return data


def read_member(ref: ImageRef) -> bytes:
    offset, size = int(ref.offset or 0), int(ref.size or 0)
    with open(ref.file, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise ImageRejected("truncated_shard", f"{ref}: the shard ends after {len(data)} of the member's {size} bytes")
    return data


def image_sha256(ref: ImageRef | Path) -> str:
    """sha256 of an image's bytes (streamed for a plain file)."""
    if isinstance(ref, ImageRef) and ref.in_shard:
        return hashlib.sha256(read_member(ref)).hexdigest()
    return file_sha256(ref.file if isinstance(ref, ImageRef) else Path(ref))


def frame_image_refs(frame: pd.DataFrame, root: Path) -> list[ImageRef]:
    """One ImageRef per manifest/split row, in row order: `file` (else `path`) relative to `root`, plus
    the member columns when the row points inside a shard."""
    files = frame["file"] if "file" in frame.columns else frame["path"]
    n = len(frame)
    offsets = frame["member_offset"] if "member_offset" in frame.columns else pd.Series([None] * n, index=frame.index)
    sizes = frame["member_size"] if "member_size" in frame.columns else pd.Series([None] * n, index=frame.index)
    members = frame["path"] if "path" in frame.columns else pd.Series([None] * n, index=frame.index)
    refs = []
    for file, offset, size, member in zip(files.astype(str), offsets, sizes, members):
        path = Path(file)
        path = path if path.is_absolute() else root / path
        if offset is None or pd.isna(offset):
            refs.append(ImageRef(path))
        else:
            refs.append(ImageRef(path, int(offset), int(size), None if member is None else str(member)))
    return refs
