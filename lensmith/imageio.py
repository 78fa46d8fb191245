"""Safe image decoding shared by every stage (ingest, training cache, evaluation, serving, drift).

`decode_image` either returns a fully decoded image normalised to mode "L" or "RGB" (EXIF orientation
applied) or raises `ImageRejected` with a short machine-readable reason and a human detail.

Only the formats in `SUPPORTED_FORMATS` are parsed: Pillow's ~40 other parsers never see the bytes, and a
file in one of those formats is rejected as `unsupported_format`. With `min_short_side` (serving), a large
image is decoded reduced by the largest integer factor that keeps its short side at least that long: a JPEG
through the decoder's DCT scaling (`Image.draft`, 1/2 to 1/8; the full-size pixels never exist), anything
else by a box-average `reduce` after decoding in the file's own mode, converted strip by strip, so no
full-size copy in another mode (3-4 bytes per pixel for a 1-byte palette image) is ever made.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Sequence
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
# What Image.open may parse, as Pillow names the formats: those of data.image_extensions' defaults
# (.jpg/.jpeg, .png, .bmp, .tif/.tiff, .webp). A camera JPEG with extra frames opens as MPO through JPEG.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
DRAFT_FORMATS = ("JPEG", "MPO")  # decoders that scale while decoding (DCT scaling by 1/2, 1/4 or 1/8)
STRIP_PIXELS = 1 << 20  # pixels per strip when an image is converted piece by piece
# EXIF orientation -> the transpose that shows the image upright (the table of ImageOps.exif_transpose)
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
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
    original_size: tuple[int, int] = (0, 0)  # (width, height) of the file's image, orientation applied
    reduction: int = 1  # `image` is the file's image reduced by about this factor (1: full size)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def sniff_format(data: bytes) -> str | None:
    """The format any of Pillow's parsers would claim from the first bytes, or None (nothing is parsed)."""
    Image.init()
    prefix = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a plugin's prefix check decides nothing else
            continue
    return None


def open_image(data: bytes, formats: Sequence[str] = SUPPORTED_FORMATS) -> Image.Image:
    """The image's header, read by the parser of one of `formats`; no pixel is decoded yet (size, mode and
    format are known). Raises ImageRejected: empty_file, unsupported_format, not_an_image, truncated_or_corrupt."""
    if not data:
        raise ImageRejected("empty_file", "file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        found = sniff_format(data)
        if found is not None and found not in formats:
            raise ImageRejected(
                "unsupported_format", f"{found} images are not supported (supported formats: {', '.join(formats)})"
            ) from None
        raise ImageRejected("not_an_image", "content is not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is None
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageRejected("truncated_or_corrupt", f"decoding failed: {type(exc).__name__}: {exc}") from None


def reduction_factor(width: int, height: int, min_short_side: int | None) -> int:
    """The largest integer factor that keeps the short side at least `min_short_side` long (1: none)."""
    if not min_short_side:
        return 1
    return max(1, min(width, height) // min_short_side)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 40_000_000,
    min_side: int = 1,
    max_aspect_ratio: float = float("inf"),
    formats: Sequence[str] = SUPPORTED_FORMATS,
    min_short_side: int | None = None,
) -> DecodedImage:
    """Decode `data` completely (truncation is detected) and normalise its mode; with `min_short_side`, the
    image reduced by the largest integer factor that keeps its short side at least that long."""
    return decode_opened(
        open_image(data, formats),
        max_pixels=max_pixels,
        min_side=min_side,
        max_aspect_ratio=max_aspect_ratio,
        min_short_side=min_short_side,
    )


def decode_opened(
    img: Image.Image,
    *,
    max_pixels: int = 40_000_000,
    min_side: int = 1,
    max_aspect_ratio: float = float("inf"),
    min_short_side: int | None = None,
) -> DecodedImage:
    """`decode_image` for an image whose header `open_image` read."""
    fmt = img.format or "UNKNOWN"
    source_mode = img.mode
    width, height = img.size
    factor = reduction_factor(width, height, min_short_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            check_geometry(width, height, max_pixels=max_pixels)  # on the header, before any pixel is decoded
            orientation = exif_orientation(img) if factor > 1 else 1
            if factor > 1 and fmt in DRAFT_FORMATS:
                scale = 1 << min(3, factor.bit_length() - 1)  # the largest of 1, 2, 4, 8 not above the factor
                img.draft(None, (max(1, width // scale), max(1, height // scale)))
            img.load()
            if factor > 1:
                img = reduced(img, reduction_factor(*img.size, min_short_side))
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is None
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageRejected("truncated_or_corrupt", f"decoding failed: {type(exc).__name__}: {exc}") from None

    check_geometry(width, height, min_side=min_side, max_aspect_ratio=max_aspect_ratio)  # rotation changes neither
    if factor == 1:
        img = apply_exif_orientation(img)
        return DecodedImage(normalise_mode(img), fmt, source_mode, img.size)
    method = ORIENTATION_TRANSPOSE.get(orientation)
    image = img.transpose(method) if method is not None else img
    swapped = orientation in (5, 6, 7, 8)
    return DecodedImage(image, fmt, source_mode, (height, width) if swapped else (width, height), round(min(width, height) / min(image.size)))


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 = as stored); 1 for a missing or malformed EXIF block."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not reject an otherwise good image
        return 1


def reduced(img: Image.Image, factor: int) -> Image.Image:
    """`normalise_mode(img).reduce(factor)` (the mean of each factor x factor block) without a full-size
    normalised copy: an image in another mode than L or RGB is converted and reduced in strips of whole
    blocks, which gives the same pixels with one strip of extra memory."""
    if img.mode in ("L", "RGB"):
        return img.reduce(factor) if factor > 1 else img
    width, height = img.size
    rows = max(1, STRIP_PIXELS // max(1, width) // factor) * factor
    top = gray_top(img) if img.mode in GRAY_MODES and img.mode not in ("1", "L") else None
    out: Image.Image | None = None
    for y in range(0, height, rows):
        piece = normalise_mode(img.crop((0, y, width, min(height, y + rows))), top=top)
        piece = piece.reduce(factor) if factor > 1 else piece
        if out is None:
            out = Image.new(piece.mode, (math.ceil(width / factor), math.ceil(height / factor)))
        out.paste(piece, (0, y // factor))
    assert out is not None
    return out


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


def gray_top(img: Image.Image) -> float:
    """The value that becomes 255 when a high-bit-depth gray image is made 8-bit: 65535 for integer images
    within 16 bits, else the image's maximum (at least 1). From the extrema: no copy of the pixels."""
    high = img.getextrema()[1]
    if img.mode.startswith("I") and high <= 65535:
        return 65535.0
    return max(float(high), 1.0)


def normalise_mode(img: Image.Image, top: float | None = None) -> Image.Image:
    """Any decodable mode -> "L" (grayscale family) or "RGB" (everything else); alpha over white.
    `top`: for a high-bit-depth gray image, the value that becomes 255 (default: `gray_top(img)`)."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in GRAY_MODES:
        if mode == "1":
            return img.convert("L")
        arr = np.asarray(img)
        if arr.dtype == np.uint8:
            return Image.fromarray(arr, "L")
        return Image.fromarray(scaled_to_uint8(arr, gray_top(img) if top is None else top), "L")
    if mode == "LA" or (mode == "P" and _palette_is_gray(img) and "transparency" not in img.info):
        if mode == "P":
            return img.convert("L")
        return _composite_on_white(img.convert("RGBA")).convert("L")
    if mode in ("RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def scaled_to_uint8(arr: np.ndarray, top: float) -> np.ndarray:
    """round(arr / top * 255) clipped to 0..255, in row blocks: no full-size float64 copy (8 bytes a pixel)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    row_pixels = arr.shape[1] if arr.ndim > 1 else 1
    rows = max(1, STRIP_PIXELS // max(1, row_pixels))
    for start in range(0, len(arr), rows):
        block = arr[start : start + rows].astype(np.float64)
        out[start : start + rows] = np.clip(block / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


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
