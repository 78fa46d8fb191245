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
LEVELS = np.arange(256, dtype=np.float64)


def gray_image(img: Image.Image) -> Image.Image:
    """The image as 8-bit luma (ITU-R 601-2, PIL's "L" conversion)."""
    return img if img.mode == "L" else img.convert("L")


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels: the usual blur/sharpness score."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    g = gray.astype(np.int16)  # exact: a Laplacian of 8-bit values lies in [-1020, 1020]
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def band_mean_std(histogram: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population std from PIL's concatenated 256-bin histograms (no pixel pass)."""
    counts = np.asarray(histogram, dtype=np.float64).reshape(-1, 256)
    n = np.maximum(counts.sum(axis=1), 1.0)
    # elementwise, not `@`: tiny BLAS calls spin up BLAS threads and are 10x slower on a busy machine
    mean = (counts * LEVELS).sum(axis=1) / n
    var = (counts * (LEVELS * LEVELS)).sum(axis=1) / n - mean * mean
    return mean, np.sqrt(np.maximum(var, 0.0))


def channel_means(img: Image.Image) -> tuple[float, float, float]:
    """Mean of R, G and B (0..255); a grayscale image has three equal means."""
    if img.mode == "L":
        mean = float(band_mean_std(img.histogram())[0][0])
        return mean, mean, mean
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    r, g, b = band_mean_std(rgb.histogram())[0]
    return float(r), float(g), float(b)


def image_stats(img: Image.Image) -> dict[str, float]:
    """brightness (mean gray), contrast (gray std), sharpness (variance of Laplacian), mean_r/g/b."""
    gray = gray_image(img)
    rgb_histogram = gray.histogram() * 3 if img.mode == "L" else (img if img.mode == "RGB" else img.convert("RGB")).histogram()
    mean, std = band_mean_std(gray.histogram() + rgb_histogram)
    return {
        "brightness": float(mean[0]),
        "contrast": float(std[0]),
        "sharpness": laplacian_variance(np.asarray(gray)),
        "mean_r": float(mean[1]),
        "mean_g": float(mean[2]),
        "mean_b": float(mean[3]),
    }


def perceptual_hash(img: Image.Image) -> str:
    """imagehash.phash as a 16-character hex string (64 bits)."""
    return str(imagehash.phash(img))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes (0 = identical, 64 = opposite)."""
    return int(imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b))
