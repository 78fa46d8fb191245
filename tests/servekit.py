"""Small real fixtures for the export and serving tests: a demo-image project with splits, an untrained
(randomly initialised) candidate saved through the modelio contract, and its exported ONNX files (built by
lensmith.testing.servekit, which bench/serve_load.py uses too).

The export is the slow step (~10-30 s for the dynamo exporter on this machine), so `exported_project()`
runs it once per test process and every test copies the result.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lensmith.layout import Layout
from lensmith.testing.servekit import ARCH, IMAGE_SIZE, PER_CLASS, build_project, make_exported_project, save_random_candidate, tiny_params

__all__ = ["ARCH", "IMAGE_SIZE", "PER_CLASS", "build_project", "copy_project", "exported_project", "jpeg_bytes", "png_bytes", "save_random_candidate", "tiny_params"]


@lru_cache(maxsize=4)
def exported_project(seed: int = 0) -> Path:
    """A project whose candidate (random weights, `seed`) went through the real `run_export`; read-only use."""
    root = Path(tempfile.mkdtemp(prefix=f"lensmith-export-{seed}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    make_exported_project(root, seed)
    return root


def copy_project(tmp: Path, seed: int = 0) -> Layout:
    target = tmp / "project"
    shutil.copytree(exported_project(seed), target, symlinks=False)
    return Layout(target)


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()
