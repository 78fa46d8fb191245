"""Decode + preprocess every image once into a uint8 N x C x H x W array on disk (a .npy memmap).

The file is keyed by a hash of the images' sha256 list and the preprocessing definition, so epochs and
later runs with the same data and input size never decode a JPEG again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lensmith.errors import DataError, ImageRejected
from lensmith.fsutil import atomic_path
from lensmith.imageio import load_image
from lensmith.preprocess import Preprocessing
from lensmith.shards import ImageRef

CACHE_FORMAT = 1
CHUNK = 64


def cache_key(sha256s: Sequence[str], preprocessing: Preprocessing) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT, "preprocessing": preprocessing.to_dict()}, sort_keys=True).encode())
    for sha in sha256s:
        digest.update(sha.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def cache_path(cache_dir: Path, sha256s: Sequence[str], preprocessing: Preprocessing) -> Path:
    return Path(cache_dir) / "images" / f"{cache_key(sha256s, preprocessing)}.npy"


def decode_to_uint8(path: Path | ImageRef, preprocessing: Preprocessing) -> np.ndarray:
    """One image (a file or a shard member) -> C x H x W uint8 at the model's input size."""
    try:
        image = load_image(path)
    except FileNotFoundError:
        raise DataError(f"image listed in the split is missing: {path}; re-run `lensmith ingest` and `lensmith split`") from None
    except ImageRejected as exc:
        raise DataError(f"image listed in the split cannot be decoded: {path} ({exc})") from None
    return preprocessing.to_uint8(image).transpose(2, 0, 1)


def cached_images(
    files: Sequence[Path | ImageRef],
    sha256s: Sequence[str],
    preprocessing: Preprocessing,
    cache_dir: Path,
    *,
    workers: int = 0,
    desc: str = "caching images",
) -> np.ndarray:
    """The N x C x H x W uint8 array for `files` (read-only memmap), built once and reused."""
    if len(files) != len(sha256s):
        raise ValueError("files and sha256s must have the same length")
    target = cache_path(cache_dir, sha256s, preprocessing)
    if target.is_file():
        try:
            return _open_cache(target, len(files), preprocessing)
        except (ValueError, OSError):
            pass  # an unreadable cache is rebuilt, never trusted
    _build_cache(target, [f if isinstance(f, ImageRef) else Path(f) for f in files], preprocessing, workers, desc)
    return _open_cache(target, len(files), preprocessing)


def _open_cache(path: Path, count: int, preprocessing: Preprocessing) -> np.ndarray:
    array = np.load(path, mmap_mode="r")
    expected = (count, preprocessing.num_channels, preprocessing.image_size, preprocessing.image_size)
    if array.shape != expected or array.dtype != np.uint8:
        raise ValueError(f"{path} has shape {array.shape}, expected {expected}")
    return array


def _build_cache(target: Path, files: list[Path | ImageRef], preprocessing: Preprocessing, workers: int, desc: str) -> None:
    shape = (len(files), preprocessing.num_channels, preprocessing.image_size, preprocessing.image_size)
    # Threads, not processes: PIL releases the GIL while decoding and resizing, and nothing is forked
    # from a process that already holds torch's thread pools.
    n_workers = workers or min(8, os.cpu_count() or 1)
    chunks = [range(start, min(start + CHUNK, len(files))) for start in range(0, len(files), CHUNK)]
    with atomic_path(target, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def fill(chunk: range) -> int:
            for i in chunk:
                out[i] = decode_to_uint8(files[i], preprocessing)
            return len(chunk)

        with ThreadPoolExecutor(max_workers=n_workers) as pool, tqdm(
            total=len(files), desc=desc, unit="img", disable=None, leave=False
        ) as bar:
            for done in pool.map(fill, chunks):
                bar.update(done)
        out.flush()
        del out
