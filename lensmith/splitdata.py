"""A split as the model sees it: images decoded once into the uint8 cache at the model's input size, plus
class indices. Training, export (parity, int8 calibration) and fine-tuning read splits through here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lensmith.datacache import cached_images
from lensmith.errors import DataError
from lensmith.layout import Layout
from lensmith.preprocess import Preprocessing
from lensmith.shards import ImageRef, frame_image_refs, image_sha256


@dataclass
class SplitData:
    images: np.ndarray  # N x C x H x W uint8 (read-only memmap)
    labels: np.ndarray  # N int64 class indices
    files: list[ImageRef]


def label_indices(frame: pd.DataFrame, classes: Sequence[str], split_name: str, fix: str) -> np.ndarray:
    """The split's labels as indices of `classes`; a label outside them is a DataError ending with `fix`."""
    index = {c: i for i, c in enumerate(classes)}
    labels = frame["label"].astype(str)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"the {split_name} split has labels {fix[0]}: {unknown}; {fix[1]}")
    return labels.map(index).to_numpy(dtype=np.int64)


def image_hashes(frame: pd.DataFrame, refs: list[ImageRef]) -> list[str]:
    """Content hashes of the split's images: the manifest's sha256 column, or hashed now when it is absent."""
    if "sha256" in frame.columns and frame["sha256"].notna().all():
        return frame["sha256"].astype(str).tolist()
    return [image_sha256(ref) for ref in refs]


TRAINING_LABELS = ("absent from the train split", "re-run the split")
MODEL_LABELS = ("the model does not know", "retrain first")


def load_split_data(
    layout: Layout,
    frame: pd.DataFrame,
    classes: Sequence[str],
    name: str,
    preprocessing: Preprocessing,
    fix: tuple[str, str] = TRAINING_LABELS,
) -> SplitData:
    refs = frame_image_refs(frame, layout.root)
    labels = label_indices(frame, classes, name, fix)
    images = cached_images(refs, image_hashes(frame, refs), preprocessing, layout.cache_dir, desc=f"caching {name}")
    return SplitData(images=images, labels=labels, files=refs)
