"""The real sample sets are written as a user's own data would be: folders, CSV manifests, metadata."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lensmith.errors import DataError
from lensmith.sampledata import fashion_mnist, write_sample_set


def test_digits_folder_has_ten_classes_of_real_8x8_scans(tmp_path: Path) -> None:
    summary = write_sample_set("digits", tmp_path / "d", per_class=5)
    assert summary.images == 50 and sorted(summary.classes) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / "d" / "7").glob("*.png")))
    assert image.size == (8, 8) and image.mode == "L" and np.asarray(image).max() > 200
    assert not (tmp_path / "d" / "metadata.csv").exists()  # digits carry no metadata


def test_csv_layout_lists_every_file_with_its_metadata(tmp_path: Path) -> None:
    summary = write_sample_set("textures", tmp_path / "t", per_class=4, layout="csv")
    manifest = pd.read_csv(tmp_path / "t" / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "region"] and len(manifest) == summary.images == 12
    assert all((tmp_path / "t" / p).is_file() for p in manifest["path"])


def test_metadata_can_be_left_out(tmp_path: Path) -> None:
    write_sample_set("textures", tmp_path / "t", per_class=2, metadata=False)
    assert not (tmp_path / "t" / "metadata.csv").exists()


def test_refuses_a_folder_that_is_not_empty_and_unknown_sets(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_sample_set("faces", tmp_path / "x")
    with pytest.raises(DataError, match="unknown sample set"):
        write_sample_set("cats", tmp_path / "y")


def test_fashion_mnist_reads_idx_files_and_checks_their_kind(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint8) % 251
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([0, 9, 0])))
    got = list(fashion_mnist(per_class=None, folder=tmp_path))
    assert [g.label for g in got] == ["tshirt", "ankle_boot", "tshirt"]
    assert np.array_equal(got[1].pixels, images[784:1568].reshape(28, 28))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress((2051).to_bytes(4, "big") + bytes(4)))
    with pytest.raises(DataError, match="not an IDX file"):
        list(fashion_mnist(per_class=None, folder=tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        list(fashion_mnist(folder=tmp_path / "missing"))
