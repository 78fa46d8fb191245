"""Small real fixtures for the export and serving tests: a demo-image project with splits, an untrained
(randomly initialised) candidate saved through the modelio contract, and its exported ONNX files.

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
import pandas as pd
from PIL import Image

from lensmith.layout import Layout
from lensmith.params import Params, params_from_dict

ARCH = "mobilenet_v3_small"
IMAGE_SIZE = 32
PER_CLASS = 8


def tiny_params(**export: object) -> Params:
    return params_from_dict(
        {
            "train": {"model": ARCH, "image_size": IMAGE_SIZE, "pretrained": False},
            "export": {"calibration_images": 16, "bench_seconds": 0.2, **export},
            "serve": {"max_wait_ms": 2.0, "reload_poll_s": 0.2, "review_threshold": 0.5},
        }
    )


def build_project(root: Path) -> Layout:
    """Demo images (5 classes, 8 each, 64 px), a by-batch split into data/splits, nothing trained yet."""
    from lensmith.demodata import generate_demo_dataset

    raw = root / "data" / "raw" / "demo"
    generate_demo_dataset(raw, sites=None, seed=0, per_class=PER_CLASS, image_size=64, workers=1)
    meta = pd.read_csv(raw / "metadata.csv")
    meta["file"] = [str(Path("data/raw/demo") / p) for p in meta["path"]]
    # every class in every split: alternate rows by position within the class
    position = meta.groupby("label").cumcount()
    split = np.where(position % 4 == 0, "test", np.where(position % 4 == 1, "val", "train"))
    layout = Layout(root)
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        meta[split == name].reset_index(drop=True).to_parquet(layout.split_file(name), index=False)
    return layout


def save_random_candidate(layout: Layout, seed: int = 0) -> None:
    """A randomly initialised model in models/candidate (export/serve mechanics need no accuracy)."""
    import torch

    from lensmith.modelio import save_trained, state_dict_sha256, portable_state_dict
    from lensmith.models import build_model, preprocessing_for

    torch.manual_seed(seed)
    classes = sorted(pd.read_parquet(layout.split_file("train"))["label"].unique())
    model = build_model(ARCH, len(classes), pretrained=False, dropout=0.0, image_size=IMAGE_SIZE).eval()
    meta = {
        "params": {"train": {"model": ARCH, "seed": seed}},
        "data_hash": {"combined": "0" * 64},
        "git_commit": "test",
        "weights_sha256": state_dict_sha256(portable_state_dict(model)),
    }
    save_trained(layout.candidate, model, arch=ARCH, classes=classes, preprocessing=preprocessing_for(ARCH, IMAGE_SIZE), meta=meta)


@lru_cache(maxsize=4)
def exported_project(seed: int = 0) -> Path:
    """A project whose candidate (random weights, `seed`) went through the real `run_export`; read-only use."""
    from lensmith.export import run_export

    root = Path(tempfile.mkdtemp(prefix=f"lensmith-export-{seed}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    layout = build_project(root)
    save_random_candidate(layout, seed)
    run_export(tiny_params(), layout)
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
