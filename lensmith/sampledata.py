"""Small real image sets that install offline, written as a user's own data would be.

None of these images were drawn by this project: scikit-learn's handwritten digits (8x8 scans),
scikit-image's bundled Labeled-Faces-in-the-Wild crops (25x25 faces and non-faces) and CC0 texture
photographs (brick, grass, gravel), and Debian's Fashion-MNIST (28x28 product photos, package
`dataset-fashion-mnist`). Tests, benchmarks and `lensmith sample-data` use them to try the pipeline
on data that is not the demo: an image folder, a CSV manifest (with or without metadata) or an S3 prefix.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lensmith.errors import DataError
from lensmith.fsutil import write_bytes_atomic

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
TEXTURES = ("brick", "grass", "gravel")
SAMPLE_SETS = ("digits", "faces", "fashion", "textures")


@dataclass(frozen=True)
class SampleImage:
    relpath: str  # <label>/<file>.png under the output folder
    label: str
    pixels: np.ndarray  # uint8, H x W (grey)
    metadata: dict[str, str]


@dataclass(frozen=True)
class SampleSet:
    out: Path
    name: str
    images: int
    classes: dict[str, int]
    metadata_columns: tuple[str, ...]

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items()))
        return f"{self.name}: {self.images} images in {len(self.classes)} classes ({counts}) -> {self.out}"


def digits(per_class: int | None = None) -> Iterator[SampleImage]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, scaled to 0..255); no metadata."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    yield from _capped(
        (
            SampleImage(f"{label}/digit-{i:05d}.png", str(label), img, {})
            for i, (img, label) in enumerate(zip(images, bunch.target))
        ),
        per_class,
    )


def faces(per_class: int | None = None) -> Iterator[SampleImage]:
    """scikit-image's LFW subset: 100 face crops and 100 non-face crops of 25x25 pixels."""
    from skimage.data import lfw_subset

    images = np.clip(np.rint(lfw_subset() * 255.0), 0, 255).astype(np.uint8)
    yield from _capped(
        (
            SampleImage(f"{label}/img-{i:03d}.png", label, img, {})
            for i, img in enumerate(images)
            for label in ["face" if i < 100 else "nonface"]
        ),
        per_class,
    )


def fashion_mnist(per_class: int | None = 100, folder: Path = FASHION_MNIST_DIR) -> Iterator[SampleImage]:
    """Debian's Fashion-MNIST test set (10,000 28x28 images, 10 classes); `part` = which block of 100 in the
    file it came from (provenance metadata, as a plant's batch or shift column would be)."""
    images_file, labels_file = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise DataError(f"Fashion-MNIST is not installed at {folder}: apt-get install dataset-fashion-mnist")
    images = _idx_array(images_file, magic=2051).reshape(-1, 28, 28)
    labels = _idx_array(labels_file, magic=2049)
    yield from _capped(
        (
            SampleImage(
                f"{FASHION_MNIST_CLASSES[label]}/fm-{i:05d}.png", FASHION_MNIST_CLASSES[label], img, {"part": f"p{i // 100:03d}"}
            )
            for i, (img, label) in enumerate(zip(images, labels))
        ),
        per_class,
    )


def textures(per_class: int | None = None, patch: int = 64) -> Iterator[SampleImage]:
    """scikit-image's CC0 brick, grass and gravel photographs (512x512) cut into non-overlapping patches;
    `region` = the quarter of the photograph a patch came from."""
    import skimage.data

    for name in TEXTURES:
        photo = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        tiles = [
            SampleImage(
                f"{name}/{name}-{y:03d}-{x:03d}.png",
                name,
                photo[y : y + patch, x : x + patch],
                {"region": f"{'top' if y < photo.shape[0] // 2 else 'bottom'}-{'left' if x < photo.shape[1] // 2 else 'right'}"},
            )
            for y in range(0, photo.shape[0] - patch + 1, patch)
            for x in range(0, photo.shape[1] - patch + 1, patch)
        ]
        yield from tiles[:per_class] if per_class else tiles


def sample_images(name: str, per_class: int | None = None) -> Iterator[SampleImage]:
    if name == "digits":
        return digits(per_class)
    if name == "faces":
        return faces(per_class)
    if name == "fashion":
        return fashion_mnist(per_class)
    if name == "textures":
        return textures(per_class)
    raise DataError(f"unknown sample set {name!r}; choose one of: {', '.join(SAMPLE_SETS)}")


def write_sample_set(
    name: str,
    out: Path,
    per_class: int | None = None,
    layout: str = "folder",
    metadata: bool = True,
) -> SampleSet:
    """Write a sample set under `out` as PNG files in `<label>/<file>` folders.

    layout "folder": an image folder (plus metadata.csv when `metadata` and the set has any);
    layout "csv": the same files plus `out/manifest.csv` (path,label[,metadata...]) listing them.
    """
    if layout not in ("folder", "csv"):
        raise DataError(f"layout must be 'folder' or 'csv', got {layout!r}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; sample data is only written into a new folder")
    rows: list[SampleImage] = list(sample_images(name, per_class))
    for image in rows:
        target = out / image.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, _png_bytes(image.pixels))
    columns = tuple(rows[0].metadata) if rows and metadata else ()
    if layout == "csv":
        _write_csv(out / "manifest.csv", ["path", "label", *columns], ([r.relpath, r.label, *(r.metadata[c] for c in columns)] for r in rows))
    elif columns:
        _write_csv(out / "metadata.csv", ["path", *columns], ([r.relpath, *(r.metadata[c] for c in columns)] for r in rows))
    classes: dict[str, int] = {}
    for image in rows:
        classes[image.label] = classes.get(image.label, 0) + 1
    return SampleSet(out, name, len(rows), classes, columns)


def _capped(images: Iterator[SampleImage], per_class: int | None) -> Iterator[SampleImage]:
    seen: dict[str, int] = {}
    for image in images:
        count = seen.get(image.label, 0)
        if per_class is None or count < per_class:
            seen[image.label] = count + 1
            yield image


def _idx_array(path: Path, magic: int) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic, dimension sizes, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic})")
    dims = data[3]
    offset = 4 + 4 * dims
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_csv(path: Path, header: list[str], rows: Iterator[list[str]]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
