"""A small project with a real exported model for serving tests and benchmarks: demo images with splits,
an untrained (randomly initialised) candidate saved through the modelio contract, and `run_export`'s
ONNX files. Test support (see lensmith.testing); the export step needs torch and onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lensmith.layout import Layout
from lensmith.params import Params, params_from_dict

ARCH = "mobilenet_v3_small"
IMAGE_SIZE = 32
PER_CLASS = 8


def tiny_params(arch: str = ARCH, image_size: int = IMAGE_SIZE, **export: object) -> Params:
    return params_from_dict(
        {
            "train": {"model": arch, "image_size": image_size, "pretrained": False},
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


def save_random_candidate(layout: Layout, seed: int = 0, arch: str = ARCH, image_size: int = IMAGE_SIZE) -> None:
    """A randomly initialised model in models/candidate (export/serve mechanics need no accuracy)."""
    import torch

    from lensmith.modelio import portable_state_dict, save_trained, state_dict_sha256
    from lensmith.models import build_model, preprocessing_for

    torch.manual_seed(seed)
    classes = sorted(pd.read_parquet(layout.split_file("train"))["label"].unique())
    model = build_model(arch, len(classes), pretrained=False, dropout=0.0, image_size=image_size).eval()
    meta = {
        "params": {"train": {"model": arch, "seed": seed}},
        "data_hash": {"combined": "0" * 64},
        "git_commit": "test",
        "weights_sha256": state_dict_sha256(portable_state_dict(model)),
    }
    save_trained(layout.candidate, model, arch=arch, classes=classes, preprocessing=preprocessing_for(arch, image_size), meta=meta)


def make_exported_project(root: Path, seed: int = 0, arch: str = ARCH, image_size: int = IMAGE_SIZE) -> Layout:
    """`build_project` + `save_random_candidate` + the real `run_export` in `root` (~10-30 s at 32 px)."""
    from lensmith.export import run_export

    layout = build_project(root)
    save_random_candidate(layout, seed, arch, image_size)
    run_export(tiny_params(arch, image_size), layout)
    return layout
