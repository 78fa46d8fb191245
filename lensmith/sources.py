"""Where images come from: an ImageFolder, a folder of shards, a CSV manifest or an s3://bucket/prefix.

`list_source` turns `data.source` into `SourceItem`s (one per candidate image, nothing read yet) plus
`Rejection`s for entries that are unusable before decoding (symlink out of the source, path escaping the
CSV's folder, missing file...). `resolve_local_files` maps manifest rows back to readable local files.
Nothing here ever writes under the source.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from lensmith.errors import DataError, SourceUnavailableError
from lensmith.fsutil import write_bytes_atomic
from lensmith.layout import Layout
from lensmith.params import DataParams, Params
from lensmith.shards import INDEX_FILE, is_shard_folder, read_shard_index

METADATA_FILE = "metadata.csv"
S3_SCHEME = "s3://"


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: endpoint/region override; credentials come from the standard AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class SourceItem:
    """One candidate image: identity `path`, its label, and where its bytes are (local file or S3 object)."""

    path: str  # POSIX path relative to the source root, or the full s3:// URI
    label: str
    local_file: Path  # the file to read (for S3: the mirror file, written when the object is fetched)
    size: int
    mtime_ns: int | None = None
    bucket: str | None = None
    key: str | None = None
    etag: str | None = None
    offset: int | None = None  # a shard member: its data is `size` bytes at `offset` in `local_file`
    sha256: str | None = None  # known content hash (a shard member's, from the shard index)
    source: str = ""  # the source it was listed from (data.source, one of data.sources, data.reviewed_dir)

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def in_shard(self) -> bool:
        return self.offset is not None


@dataclass(frozen=True)
class Rejection:
    path: str
    reason: str
    detail: str


@dataclass
class SourceListing:
    description: str  # the source as the user should read it in messages
    items: list[SourceItem] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    metadata: pd.DataFrame | None = None  # indexed by identity `path`; columns joined into the manifest

    def add(self, outcome: SourceItem | Rejection) -> None:
        if isinstance(outcome, Rejection):
            self.rejections.append(outcome)
        else:
            self.items.append(outcome)


# ---------------------------------------------------------------------------------------------- dispatch


def is_s3_uri(source: str) -> bool:
    return source.startswith(S3_SCHEME)


def local_source_path(source: str, layout: Layout) -> Path:
    """`data.source` as an absolute path (relative ones are relative to the project root)."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else layout.root / path


def list_source(data: DataParams, layout: Layout, *, root_label: str | None = None) -> SourceListing:
    """Dispatch on `data.source`: s3:// URI, CSV manifest file, shard folder or ImageFolder directory.

    Images at the source root have no <class>/ folder: rejected as `no_label`, or listed with `root_label`
    (drift windows list them unlabelled, "") after the same symlink, file-type and key checks as any other."""
    extensions = set(data.image_extensions)
    if is_s3_uri(data.source):
        return list_s3_folder(data.source, extensions, s3_settings(data), layout, data.max_file_bytes, root_label)
    root = local_source_path(data.source, layout)
    if not root.exists():
        raise SourceUnavailableError(f"data.source {data.source!r} does not exist (looked at {root})")
    if root.is_dir() and is_shard_folder(root):
        return list_shard_folder(root, extensions, root_label)
    if root.is_dir():
        return list_image_folder(root, extensions, root_label)
    if root.is_file() and root.suffix.lower() == ".csv":
        return list_csv_manifest(root, extensions)
    raise DataError(
        f"data.source {data.source!r} is neither a folder (<class>/<file>), a .csv manifest nor an s3://bucket/prefix URI"
    )


def source_specs(data: DataParams, layout: Layout) -> list[str]:
    """The sources ingest reads, in order: data.source, data.sources, then data.reviewed_dir when it exists."""
    specs = [data.source, *data.sources]
    if local_source_path(data.reviewed_dir, layout).is_dir():
        specs.append(data.reviewed_dir)
    return list(dict.fromkeys(specs))


def list_sources(data: DataParams, layout: Layout) -> SourceListing:
    """Every source ingest reads, as one listing. Rows of data.source keep their identity path (so earlier
    manifests and splits still match); other sources' paths are prefixed with the source (`data/reviewed/ok/x.png`)
    so two sources never share one. Metadata: each source's own, the union of their columns."""
    listings = []
    for spec in source_specs(data, layout):
        listing = list_source(data.model_copy(update={"source": spec}), layout)
        listings.append(tagged_listing(listing, spec, prefixed=spec != data.source))
    return merged_listing(listings)


def identity_in_source(spec: str, path: str) -> str:
    return path if is_s3_uri(path) else f"{spec.rstrip('/')}/{path}"


def tagged_listing(listing: SourceListing, spec: str, *, prefixed: bool) -> SourceListing:
    """`listing` with each item's source set, and its identity paths prefixed by `spec` when `prefixed`."""
    rename = (lambda path: identity_in_source(spec, path)) if prefixed else (lambda path: path)
    tagged = SourceListing(description=listing.description)
    tagged.items = [replace(item, path=rename(item.path), source=spec) for item in listing.items]
    tagged.rejections = [replace(r, path=rename(r.path)) for r in listing.rejections]
    if listing.metadata is not None:
        tagged.metadata = listing.metadata.rename(index=rename)
        tagged.metadata.index.name = "path"
    return tagged


def merged_listing(listings: list[SourceListing]) -> SourceListing:
    merged = SourceListing(description=" + ".join(listing.description for listing in listings))
    for listing in listings:
        merged.items += listing.items
        merged.rejections += listing.rejections
    frames = [listing.metadata for listing in listings if listing.metadata is not None]
    if frames:
        merged.metadata = pd.concat(frames, axis=0, sort=False) if len(frames) > 1 else frames[0]
        merged.metadata.index.name = "path"
    return merged


# ------------------------------------------------------------------------------------------- local helpers


def has_image_extension(name: str, extensions: set[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def is_hidden(parts: tuple[str, ...] | list[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def is_within(path: Path, root: Path) -> bool:
    """Lexical containment of normalised absolute paths (string test: `root in path.parents` is slow)."""
    p, r = str(path), str(root).rstrip(os.sep)
    return p == r or p.startswith(r + os.sep)


def symlink_escape_detail(path: Path, real_root: Path) -> str | None:
    """If `path` is (or passes through) a symlink resolving outside `real_root`, say where it points."""
    target = path.resolve()
    if is_within(target, real_root):
        return None
    return f"resolves to {target}, outside the source {real_root}"


def local_item(identity: str, label: str, file: Path) -> SourceItem | Rejection:
    try:
        st = file.stat()
    except FileNotFoundError:
        return Rejection(identity, "missing_file", f"{file} does not exist (or is a dangling symlink)")
    except OSError as exc:
        return Rejection(identity, "unreadable_file", f"{file}: {exc}")
    if not file.is_file():
        return Rejection(identity, "not_a_file", f"{file} is not a regular file")
    return SourceItem(path=identity, label=label, local_file=file, size=st.st_size, mtime_ns=st.st_mtime_ns)


def read_metadata_csv(data: bytes | Path, origin: str) -> pd.DataFrame:
    """metadata.csv (a `path` column relative to the source root + metadata columns), indexed by path."""
    try:
        frame = pd.read_csv(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{origin} is not a readable CSV: {exc}") from None
    if "path" not in frame.columns:
        raise DataError(f"{origin} has no 'path' column (columns: {', '.join(map(str, frame.columns))})")
    frame = frame.drop(columns=[c for c in ("label",) if c in frame.columns])
    frame["path"] = [posix_relative(str(p)) for p in frame["path"]]
    return frame.drop_duplicates("path", keep="first").set_index("path")


def posix_relative(raw: str) -> str:
    """Normalise a relative path written with / or \\ and ./ segments to POSIX form."""
    return PurePosixPath(os.path.normpath(raw.replace("\\", "/"))).as_posix()


# ------------------------------------------------------------------------------------------- ImageFolder


def list_image_folder(root: Path, extensions: set[str], root_label: str | None = None) -> SourceListing:
    """`<root>/<class>/<...>/<file>`: the label is the first directory under the root (`root_label` for files
    at the root; None rejects them)."""
    listing = SourceListing(description=str(root))
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            if (here / name).is_symlink():
                # os.walk does not descend into symlinked folders; say so when they lead out of the source.
                detail = symlink_escape_detail(here / name, real_root)
                if detail:
                    listing.rejections.append(
                        Rejection(PurePosixPath(*rel_dir, name).as_posix(), "symlink_outside_source", detail)
                    )
        for name in sorted(filenames):
            if name.startswith(".") or not has_image_extension(name, extensions):
                continue
            identity = PurePosixPath(*rel_dir, name).as_posix()
            file = here / name
            if not rel_dir and root_label is None:
                listing.rejections.append(Rejection(identity, "no_label", "image at the source root, not in a <class>/ folder"))
                continue
            detail = symlink_escape_detail(file, real_root) if file.is_symlink() else None
            if detail:
                listing.rejections.append(Rejection(identity, "symlink_outside_source", detail))
                continue
            outcome = local_item(identity, rel_dir[0] if rel_dir else str(root_label), file)
            listing.add(outcome)
    metadata_file = root / METADATA_FILE
    if metadata_file.is_file():
        listing.metadata = read_metadata_csv(metadata_file, str(metadata_file))
    return listing


# ------------------------------------------------------------------------------------------- shard folder


def list_shard_folder(root: Path, extensions: set[str], root_label: str | None = None) -> SourceListing:
    """Members of the shards in `root` (lensmith.shards), with the same rules as an ImageFolder: the label
    is the first directory of the member path; hidden members are skipped; nothing is read but the index.
    Loose image files in `root` (e.g. added by hand beside the shards) are listed too, as files."""
    listing = SourceListing(description=f"{root} (shards)")
    index = read_shard_index(root)
    shard_sizes: dict[str, int | None] = {}
    seen: set[str] = set()
    for path, shard, offset, size, sha in index[["path", "shard", "offset", "size", "sha256"]].itertuples(index=False):
        outcome = shard_member_item(
            root, str(path), str(shard), int(offset), int(size), str(sha), extensions, shard_sizes, root_label
        )
        if outcome is None:
            continue
        if isinstance(outcome, SourceItem) and outcome.path in seen:
            outcome = Rejection(outcome.path, "duplicate_path", f"listed more than once in {root / INDEX_FILE}; first kept")
        listing.add(outcome)
        if isinstance(outcome, SourceItem):
            seen.add(outcome.path)
    add_loose_files(listing, list_image_folder(root, extensions, root_label), seen)
    return listing


def add_loose_files(listing: SourceListing, loose: SourceListing, members: set[str]) -> None:
    """Image files beside the shards join the listing; a file with a member's path loses to the member."""
    for item in loose.items:
        if item.path in members:
            detail = "both a file and a shard member; the member is used"
            listing.rejections.append(Rejection(item.path, "duplicate_path", detail))
        else:
            listing.items.append(item)
    listing.rejections += loose.rejections
    listing.metadata = loose.metadata


def shard_member_item(
    root: Path, path: str, shard: str, offset: int, size: int, sha: str, extensions: set[str],
    shard_sizes: dict[str, int | None], root_label: str | None = None,
) -> SourceItem | Rejection | None:
    """The member as an item, why it is unusable, or None for a hidden member (skipped, as in a folder)."""
    detail = unsafe_member_detail(path) or unsafe_member_detail(shard)
    if detail or "/" in shard:
        return Rejection(path, "path_escapes_root", detail or f"shard name {shard!r} is not a file in {root}")
    if is_hidden(path.split("/")):
        return None
    if not has_image_extension(path, extensions):
        return Rejection(path, "unsupported_extension", f"extension not in data.image_extensions {sorted(extensions)}")
    parts = path.split("/")
    if len(parts) < 2 and root_label is None:
        return Rejection(path, "no_label", f"member of {shard} at the shard root, not in a <class>/ folder")
    if shard not in shard_sizes:
        file = root / shard
        shard_sizes[shard] = file.stat().st_size if file.is_file() else None
    available = shard_sizes[shard]
    if available is None:
        return Rejection(path, "missing_shard", f"shard {root / shard} listed in {INDEX_FILE} does not exist")
    if offset < 0 or offset + size > available:
        return Rejection(
            path, "truncated_shard", f"{root / shard} is {available} bytes; member {path} needs bytes {offset}..{offset + size}"
        )
    label = parts[0] if len(parts) >= 2 else str(root_label)
    return SourceItem(path=path, label=label, local_file=root / shard, size=size, offset=offset, sha256=sha)


def unsafe_member_detail(path: str) -> str | None:
    """Absolute paths and '.', '..' or empty segments could name something outside the folder: refuse them."""
    if path.startswith("/") or "\\" in path:
        return f"{path!r} is absolute or uses backslashes"
    return unsafe_key_detail(path)


# ------------------------------------------------------------------------------------------ CSV manifest


def list_csv_manifest(csv_path: Path, extensions: set[str]) -> SourceListing:
    """`path,label[,metadata...]` rows; relative paths are resolved against the CSV's folder."""
    listing = SourceListing(description=str(csv_path))
    try:
        frame = pd.read_csv(csv_path, dtype={"path": str, "label": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {csv_path} is not a readable CSV: {exc}") from None
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise DataError(
            f"manifest {csv_path} needs columns path,label[,metadata...]; missing {', '.join(missing)} "
            f"(found: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    base = csv_path.parent.resolve()
    seen: set[str] = set()
    metadata_rows: list[dict[str, Any]] = []
    meta_columns = [c for c in frame.columns if c not in ("path", "label")]
    for row in frame.to_dict("records"):
        outcome = csv_row_item(row, base, extensions, seen)
        if isinstance(outcome, Rejection):
            listing.rejections.append(outcome)
            continue
        seen.add(outcome.path)
        listing.items.append(outcome)
        metadata_rows.append({"path": outcome.path, **{c: row[c] for c in meta_columns}})
    if meta_columns:
        listing.metadata = pd.DataFrame(metadata_rows, columns=["path", *meta_columns]).set_index("path")
    return listing


def csv_row_item(row: dict[str, Any], base: Path, extensions: set[str], seen: set[str]) -> SourceItem | Rejection:
    raw = row["path"]
    if not isinstance(raw, str) or not raw.strip():
        return Rejection(str(raw), "missing_path", "manifest row has an empty path")
    lexical = Path(os.path.normpath(base / raw.strip().replace("\\", "/")))
    if not is_within(lexical, base):
        return Rejection(raw, "path_escapes_root", f"{raw!r} resolves to {lexical}, outside the manifest's folder {base}")
    identity = lexical.relative_to(base).as_posix()
    label = row["label"]
    if not isinstance(label, str) or not label.strip():
        return Rejection(identity, "missing_label", "manifest row has an empty label")
    if identity in seen:
        return Rejection(identity, "duplicate_path", "path listed more than once in the manifest; first row kept")
    if not has_image_extension(identity, extensions):
        return Rejection(identity, "unsupported_extension", f"extension not in data.image_extensions {sorted(extensions)}")
    detail = symlink_escape_detail(lexical, base)
    if detail:
        return Rejection(identity, "symlink_outside_source", detail)
    return local_item(identity, label.strip(), lexical)


# -------------------------------------------------------------------------------------------------- S3


def s3_settings(data: DataParams) -> S3Settings:
    return S3Settings(endpoint_url=data.s3_endpoint_url)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/"); the prefix is "" or ends with "/"."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"data.source {uri!r}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_s3_client(settings: S3Settings) -> Any:
    """A boto3 S3 client that fails in seconds, not minutes, when the endpoint is down."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=3,
        read_timeout=20,
        retries={"max_attempts": 2, "mode": "standard"},
        signature_version="s3v4",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config
    )


def describe_s3_failure(exc: Exception, client: Any, bucket: str, prefix: str) -> str:
    """One line: which endpoint and bucket, and what went wrong, in words a user can act on."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "the default AWS endpoint"
    where = f"s3://{bucket}/{prefix} at {endpoint}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return f"cannot read {where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "unknown"))
        message = str(error.get("Message", "")).strip()
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}:
            return f"access to {where} refused ({code}: {message}); check the AWS credentials/profile"
        if code in {"NoSuchBucket", "404"}:
            return f"bucket {bucket!r} does not exist at {endpoint}"
        return f"S3 error reading {where}: {code}: {message}"
    return f"cannot reach S3 endpoint {endpoint} for s3://{bucket}/{prefix}: {type(exc).__name__}: {exc}"


def s3_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def s3_mirror_file(layout: Layout, bucket: str, key: str) -> Path:
    return layout.s3_mirror / bucket / Path(*PurePosixPath(key).parts)


def unsafe_key_detail(rel: str) -> str | None:
    """Keys with empty, '.' or '..' segments would land outside the mirror folder: refuse them."""
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"key segment '.', '..' or empty in {rel!r}"
    return None


def list_s3_folder(
    uri: str, extensions: set[str], settings: S3Settings, layout: Layout, max_file_bytes: int,
    root_label: str | None = None,
) -> SourceListing:
    """ImageFolder layout under an S3 prefix (+ optional metadata.csv); nothing is downloaded but metadata."""
    bucket, prefix = parse_s3_uri(uri)
    client = make_s3_client(settings)
    listing = SourceListing(description=f"s3://{bucket}/{prefix}")
    metadata_key: str | None = None
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                rel = key[len(prefix) :]
                if rel == METADATA_FILE:
                    metadata_key = key
                    continue
                parts = rel.split("/")
                if is_hidden(parts) or not has_image_extension(rel, extensions):
                    continue
                outcome = s3_item(bucket, key, rel, obj, layout, root_label)
                listing.add(outcome)
        if metadata_key is not None:
            body = client.get_object(Bucket=bucket, Key=metadata_key)["Body"].read()
            metadata = read_metadata_csv(body, f"s3://{bucket}/{metadata_key}")
            metadata.index = [f"s3://{bucket}/{prefix}{p}" for p in metadata.index]
            metadata.index.name = "path"
            listing.metadata = metadata
    except s3_errors() as exc:
        raise SourceUnavailableError(describe_s3_failure(exc, client, bucket, prefix)) from None
    return listing


def s3_item(
    bucket: str, key: str, rel: str, obj: dict[str, Any], layout: Layout, root_label: str | None = None
) -> SourceItem | Rejection:
    identity = f"s3://{bucket}/{key}"
    detail = unsafe_key_detail(rel)
    if detail:
        return Rejection(identity, "path_escapes_root", detail)
    parts = rel.split("/")
    if len(parts) < 2 and root_label is None:
        return Rejection(identity, "no_label", "object at the prefix root, not in a <class>/ folder")
    return SourceItem(
        path=identity,
        label=parts[0] if len(parts) >= 2 else str(root_label),
        local_file=s3_mirror_file(layout, bucket, key),
        size=int(obj.get("Size", 0)),
        bucket=bucket,
        key=key,
        etag=str(obj.get("ETag", "")).strip('"'),
    )


_CLIENTS: dict[tuple[int, S3Settings], Any] = {}


def cached_s3_client(settings: S3Settings) -> Any:
    """One client per process: keyed by pid so a forked worker never reuses its parent's open connections."""
    key = (os.getpid(), settings)
    if key not in _CLIENTS:
        _CLIENTS[key] = make_s3_client(settings)
    return _CLIENTS[key]


def fetch_s3_object(settings: S3Settings, bucket: str, key: str, mirror: Path) -> bytes:
    """Download one object and write it to its mirror file (atomically); return its bytes."""
    body = cached_s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
    write_bytes_atomic(mirror, body)
    return body


# ------------------------------------------------------------------------------------- manifest -> files


def manifest_file_path(file: str, layout: Layout) -> Path:
    path = Path(file)
    return path if path.is_absolute() else layout.root / path


def file_column_value(path: Path, layout: Layout) -> str:
    """Relative to the project root when inside it (portable), else absolute."""
    absolute = Path(os.path.abspath(path))
    for root in (Path(os.path.abspath(layout.root)), layout.root.resolve()):
        if is_within(absolute, root):
            return absolute.relative_to(root).as_posix()
    return str(absolute)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_local_files(manifest: pd.DataFrame, params: Params, layout: Layout) -> list[Path]:
    """The local file for every manifest row, in row order; missing S3 mirror files are re-downloaded
    and checked against the row's sha256. Raises DataError when a file is gone or has changed."""
    settings = s3_settings(params.data)
    files: list[Path] = []
    for path, file, sha in zip(manifest["path"], manifest["file"], manifest["sha256"]):
        local = manifest_file_path(str(file), layout)
        if not local.is_file():
            if not str(path).startswith(S3_SCHEME):
                raise DataError(f"{path}: file {local} is missing; re-run `lensmith ingest`")
            local = restore_s3_mirror(str(path), str(sha), local, settings)
        files.append(local)
    return files


def restore_s3_mirror(uri: str, sha256: str, mirror: Path, settings: S3Settings) -> Path:
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    client = cached_s3_client(settings)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_errors() as exc:
        raise SourceUnavailableError(describe_s3_failure(exc, client, bucket, key)) from None
    if sha256_hex(body) != sha256:
        raise DataError(f"{uri} changed since it was ingested (sha256 differs); re-run `lensmith ingest`")
    write_bytes_atomic(mirror, body)
    return mirror
