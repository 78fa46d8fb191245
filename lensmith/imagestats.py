"""Per-image statistics shared by ingest, drift and serving: pure functions on a decoded PIL image.

All statistics are computed on the 8-bit image as decoded by `lensmith.imageio.decode_image`
(mode "L" or "RGB", orientation applied), so every stage that reuses them measures the same thing.
"""

from __future__ import annotations

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401 - phash imports it lazily; importing here spares every forked worker
from PIL import Image

IMAGE_STAT_COLUMNS: tuple[str, ...] = ("brightness", "contrast", "sharpness", "mean_r", "mean_g", "mean_b")
PHASH_HEX_CHARS = 16  # imagehash.phash with hash_size=8 -> 64 bits


def gray_array(img: Image.Image) -> np.ndarray:
    """The image as float32 luma (ITU-R 601-2, what PIL's "L" conversion computes), 0..255."""
    gray = img if img.mode == "L" else img.convert("L")
    return np.asarray(gray, dtype=np.float32)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels: the usual blur/sharpness score."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    center = gray[1:-1, 1:-1]
    lap = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * center
    return float(lap.var())


def channel_means(img: Image.Image) -> tuple[float, float, float]:
    """Mean of R, G and B (0..255); a grayscale image has three equal means."""
    if img.mode == "L":
        mean = float(np.asarray(img, dtype=np.float32).mean())
        return mean, mean, mean
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    means = np.asarray(rgb, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return float(means[0]), float(means[1]), float(means[2])


def image_stats(img: Image.Image) -> dict[str, float]:
    """brightness (mean gray), contrast (gray std), sharpness (variance of Laplacian), mean_r/g/b."""
    gray = gray_array(img)
    mean_r, mean_g, mean_b = channel_means(img)
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "sharpness": laplacian_variance(gray),
        "mean_r": mean_r,
        "mean_g": mean_g,
        "mean_b": mean_b,
    }


def perceptual_hash(img: Image.Image) -> str:
    """imagehash.phash as a 16-character hex string (64 bits)."""
    return str(imagehash.phash(img))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes (0 = identical, 64 = opposite)."""
    return int(imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b))
