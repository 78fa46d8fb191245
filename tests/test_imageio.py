"""decode_image: rejection reasons and mode normalisation on real encoded bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lensmith.errors import ImageRejected
from lensmith.imageio import check_geometry, decode_image


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise_rgb(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def rejection_reason(data: bytes, **limits: object) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, **limits)  # type: ignore[arg-type]
    return caught.value.reason


def test_rejects_empty_text_and_truncated_files() -> None:
    assert rejection_reason(b"") == "empty_file"
    assert rejection_reason(b"GIF? no, just text pretending to be a picture") == "not_an_image"
    for fmt in ("JPEG", "PNG"):
        data = encode(noise_rgb(), fmt)
        assert rejection_reason(data[: len(data) // 2]) == "truncated_or_corrupt", fmt


def test_rejects_bombs_tiny_images_and_absurd_aspect_ratios_by_limits() -> None:
    assert rejection_reason(encode(noise_rgb(100, 100), "PNG"), max_pixels=9_999) == "decompression_bomb"
    assert rejection_reason(encode(Image.new("RGB", (1, 1)), "PNG"), min_side=8) == "too_small"
    assert rejection_reason(encode(Image.new("L", (400, 8)), "PNG"), max_aspect_ratio=20.0) == "bad_aspect_ratio"
    assert decode_image(encode(noise_rgb(100, 100), "PNG"), max_pixels=10_000).width == 100


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit gray) followed by one tiny IDAT: a classic bomb shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def test_bomb_is_refused_before_pixels_are_decoded() -> None:
    # Decoding 30000x30000 would allocate 900 MB; the header alone must be enough to refuse it.
    with pytest.raises(ImageRejected, match="900000000 pixels exceeds max_pixels=40000000"):
        decode_image(png_header_only(30000, 30000), max_pixels=40_000_000)


def test_check_geometry_accepts_normal_sizes() -> None:
    check_geometry(128, 96, max_pixels=20_000, min_side=8, max_aspect_ratio=2.0)
    with pytest.raises(ImageRejected):
        check_geometry(128, 96, max_pixels=10_000)


@pytest.mark.parametrize(
    ("make", "fmt", "source_mode", "mode"),
    [
        (lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", "CMYK", "RGB"),
        (lambda: Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG", "I;16", "L"),
        (lambda: noise_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", "P", "RGB"),
        (lambda: Image.new("RGBA", (20, 20), (255, 0, 0, 0)), "PNG", "RGBA", "RGB"),
        (lambda: Image.new("LA", (20, 20), (10, 255)), "PNG", "LA", "L"),
        (lambda: Image.new("L", (20, 20), 77), "PNG", "L", "L"),
        (lambda: Image.new("1", (20, 20), 1), "PNG", "1", "L"),
        (lambda: noise_rgb(), "WEBP", "RGB", "RGB"),
        (lambda: noise_rgb(), "TIFF", "RGB", "RGB"),
        (lambda: noise_rgb(), "BMP", "RGB", "RGB"),
    ],
    ids=["cmyk-jpeg", "16bit-png", "palette-png", "rgba-png", "la-png", "gray-png", "1bit-png", "webp", "tiff", "bmp"],
)
def test_modes_are_normalised_to_l_or_rgb(make, fmt: str, source_mode: str, mode: str) -> None:  # noqa: ANN001
    decoded = decode_image(encode(make(), fmt))
    assert decoded.source_mode == source_mode and decoded.image.mode == mode and decoded.format == fmt
    assert decoded.image.size == make().size


def test_normalised_pixel_values_are_what_the_file_means() -> None:
    cmyk = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)).image
    r, g, b = cmyk.getpixel((8, 8))
    assert r > 240 and g < 20 and b < 20  # pure red
    sixteen = decode_image(encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG")).image
    assert sixteen.getpixel((4, 4)) == round(40000 / 65535 * 255)
    transparent = decode_image(encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")).image
    assert transparent.getpixel((4, 4)) == (255, 255, 255)  # fully transparent -> the white background


def test_exif_orientation_is_applied() -> None:
    img = noise_rgb(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert (decoded.width, decoded.height) == (20, 60)
    plain = decode_image(encode(img, "JPEG"))
    assert (plain.width, plain.height) == (60, 20)
