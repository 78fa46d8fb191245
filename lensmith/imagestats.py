"""Per-image statistics shared by ingest, drift and serving: pure functions on a decoded PIL image.

All statistics are computed on the 8-bit image as decoded by `lensmith.imageio.decode_image`
(mode "L" or "RGB", orientation applied), so every stage that reuses them measures the same thing.
"""

from __future__ import annotations

import array

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401 - phash imports it lazily; importing here spares every forked worker
from PIL import Image

PHASH_HEX_CHARS = 16  # imagehash.phash with hash_size=8 -> 64 bits
INT_LEVELS = np.arange(256, dtype=np.int64)
INT_LEVELS_SQUARED = INT_LEVELS * INT_LEVELS
BLOCK_PIXELS = 1 << 18  # pixels per block of rows in laplacian_variance


def gray_image(img: Image.Image) -> Image.Image:
    """The image as 8-bit luma (ITU-R 601-2, PIL's "L" conversion)."""
    return img if img.mode == "L" else img.convert("L")


def exact_variance(total: int, total_of_squares: int, n: int) -> float:
    """Population variance from integer sums, exact until the one final division."""
    return max(n * total_of_squares - total * total, 0) / (n * n)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels: the usual blur/sharpness score.

    Computed in blocks of rows with exact integer sums: the same number as over the whole image at once,
    without int16/int64 copies of a full-size image (8 bytes a pixel for the int64 one)."""
    height, width = gray.shape[:2]
    if height < 3 or width < 3:
        return 0.0
    total = squares = 0
    rows = max(1, BLOCK_PIXELS // width)
    for start in range(1, height - 1, rows):
        stop = min(height - 1, start + rows)
        g = gray[start - 1 : stop + 1].astype(np.int16)  # exact: a Laplacian of 8-bit values lies in [-1020, 1020]
        lap = g[:-2, 1:-1] + g[2:, 1:-1]
        lap += g[1:-1, :-2]
        lap += g[1:-1, 2:]
        lap -= g[1:-1, 1:-1] * np.int16(4)
        flat = lap.ravel().astype(np.int64)  # integer sums: exact, and no float temporaries (this runs per served image)
        total += int(flat.sum())
        squares += int(flat @ flat)
    return exact_variance(total, squares, (height - 2) * (width - 2))


def band_mean_std(histogram: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population std from PIL's concatenated 256-bin histograms (no pixel pass)."""
    counts = np.frombuffer(array.array("q", histogram), dtype=np.int64).reshape(-1, 256)
    # integer dot products (no BLAS: tiny BLAS calls spin up BLAS threads, 10x slower on a busy machine)
    n, totals, squares = counts.sum(axis=1).tolist(), (counts @ INT_LEVELS).tolist(), (counts @ INT_LEVELS_SQUARED).tolist()
    mean = np.array([t / max(k, 1) for t, k in zip(totals, n)])
    std = np.sqrt([exact_variance(t, q, max(k, 1)) for t, q, k in zip(totals, squares, n)])
    return mean, std


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
