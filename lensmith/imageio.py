"""Safe image decoding shared by every stage (ingest, training cache, evaluation, serving, drift).

`decode_image` either returns a fully decoded image normalised to mode "L" or "RGB" (EXIF orientation
applied) or raises `ImageRejected` with a short machine-readable reason and a human detail.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lensmith.errors import ImageRejected
from lensmith.shards import ImageRef, read_image_bytes


# Decompression bombs are checked explicitly against params (data.max_pixels) before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
EXIF_ORIENTATION = 0x0112
# Pillow's format plugins raise more than OSError on hostile or damaged files; none may crash a stage.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    MemoryError,
)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode "L" or "RGB", orientation applied
    format: str  # container format as PIL names it (JPEG, PNG, ...)
    source_mode: str  # the mode stored in the file (CMYK, P, I;16, RGBA ...)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 40_000_000,
    min_side: int = 1,
    max_aspect_ratio: float = float("inf"),
) -> DecodedImage:
    """Decode `data` completely (truncation is detected) and normalise its mode."""
    if not data:
        raise ImageRejected("empty_file", "file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "UNKNOWN"
            check_geometry(*img.size, max_pixels=max_pixels)
            img.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "content is not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is None
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageRejected("truncated_or_corrupt", f"decoding failed: {type(exc).__name__}: {exc}") from None

    source_mode = img.mode
    img = apply_exif_orientation(img)
    check_geometry(img.width, img.height, min_side=min_side, max_aspect_ratio=max_aspect_ratio)
    return DecodedImage(image=normalise_mode(img), format=fmt, source_mode=source_mode)


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; images without one are returned as they are (no copy)."""
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
            return img
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a malformed EXIF block must not reject an otherwise good image
        return img


def check_geometry(
    width: int,
    height: int,
    *,
    max_pixels: int | None = None,
    min_side: int = 1,
    max_aspect_ratio: float = float("inf"),
) -> None:
    """Raise ImageRejected when the size breaks a limit (also used on already-ingested rows)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height} has a side below min_side={min_side}")
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > max_aspect_ratio:
        raise ImageRejected("bad_aspect_ratio", f"{width}x{height} aspect {aspect:.1f} exceeds {max_aspect_ratio}")


def normalise_mode(img: Image.Image) -> Image.Image:
    """Any decodable mode -> "L" (grayscale family) or "RGB" (everything else); alpha over white."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in GRAY_MODES:
        if mode == "1":
            return img.convert("L")
        arr = np.asarray(img)
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, "L")
        arr = arr.astype(np.float64)
        top = 65535.0 if mode.startswith("I") and arr.max(initial=0) <= 65535 else max(float(arr.max(initial=1)), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if mode == "LA" or (mode == "P" and _palette_is_gray(img) and "transparency" not in img.info):
        if mode == "P":
            return img.convert("L")
        return _composite_on_white(img.convert("RGBA")).convert("L")
    if mode in ("RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _palette_is_gray(img: Image.Image) -> bool:
    palette = img.getpalette() or []
    triples = np.asarray(palette, dtype=np.int32).reshape(-1, 3)
    return bool(len(triples)) and bool(np.all(triples[:, 0] == triples[:, 1]) and np.all(triples[:, 1] == triples[:, 2]))


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(source: ImageRef | Path | str, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Read (a file, or a member of a shard) and decode an image (normalised mode, orientation applied)."""
    return decode_image(read_image_bytes(source), max_pixels=max_pixels).image
