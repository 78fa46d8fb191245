"""The one preprocessing definition: stored in every model's metadata and reused by train, evaluate,
export parity, serving and drift. Implemented with PIL + numpy so serving and monitoring need no torch.

Two steps, split so the expensive one can be cached:
  1. `to_uint8(image)`   decoded PIL image -> HxWxC uint8 array at the model's input size (resize,
                         centre crop, channel conversion). Cached once per image for training.
  2. `normalize(batch)`  NxCxHxW uint8 -> float32 (x/255 - mean) / std.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    resize: int  # shorter side is resized to this, then a centre crop of image_size is taken
    channels: Literal["RGB", "L"] = "RGB"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # on the 0..1 scale
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    version: int = field(default=1)

    def __post_init__(self) -> None:
        n = 3 if self.channels == "RGB" else 1
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"mean/std must have {n} values for channels={self.channels}")
        if self.resize < self.image_size:
            raise ValueError("resize must be >= image_size")

    @property
    def num_channels(self) -> int:
        return 3 if self.channels == "RGB" else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Decoded image -> HxWxC uint8 at image_size (C = 3 for RGB, 1 for L)."""
        img = image.convert(self.channels) if image.mode != self.channels else image
        w, h = img.size
        scale = self.resize / min(w, h)
        new_w, new_h = max(self.resize, round(w * scale)), max(self.resize, round(h * scale))
        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=resample)
        left = (new_w - self.image_size) // 2
        top = (new_h - self.image_size) // 2
        if (left, top, new_w, new_h) != (0, 0, self.image_size, self.image_size):
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def normalize(self, batch_nchw_uint8: np.ndarray) -> np.ndarray:
        """NxCxHxW uint8 -> float32 normalised (numpy; torch code uses `normalize_tensor`)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        # Same operations in the same order as ((x / 255) - mean) / std, so the same float32 bits, but the
        # uint8 -> NCHW copy is made first (float ops on a transposed NHWC view were ~10x slower) and the
        # arithmetic runs in place (no 3 temporary float32 batches to allocate and page in).
        out = np.ascontiguousarray(batch_nchw_uint8).astype(np.float32)
        out /= 255.0
        out -= mean
        out /= std
        return out

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images -> model-ready float32 NxCxHxW (what ONNX Runtime is fed)."""
        arrays = np.stack([self.to_uint8(img) for img in images]).transpose(0, 3, 1, 2)
        return self.normalize(arrays)

    def normalize_tensor(self, batch_uint8: Any) -> Any:
        """torch NxCxHxW uint8 (or float 0..255) -> float32 normalised, on the batch's device."""
        mean, std = _mean_std(tuple(self.mean), tuple(self.std), str(batch_uint8.device))
        return (batch_uint8.float() / 255.0 - mean) / std


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[Any, Any]:
    """mean and std as 1 x C x 1 x 1 float32 tensors on `device`, made once: building them from Python lists
    on every batch is a blocking host-to-GPU copy, which stalls the host until the GPU's queue is empty."""
    import torch

    # normal tensors even when first asked for inside inference_mode: an inference tensor could not be saved for
    # the backward pass of a gradient through the input (FGSM)
    with torch.inference_mode(False):
        return (
            torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device),
        )
