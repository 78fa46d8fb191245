"""Every bad input the issue lists, through run_ingest on real files: quarantined with a reason, normalised,
or refused with a clear error; and the source is never modified."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_test_image
from PIL import Image

from lensmith.errors import DataError, SourceUnavailableError
from lensmith.ingest import run_ingest
from lensmith.layout import Layout
from lensmith.params import Params


def params_for(source: Path | str, **data: object) -> Params:
    params = Params()
    params.data.source = str(source)
    params.data.workers = 1
    params.validate.max_bad_fraction = 0.5
    for key, value in data.items():
        setattr(params.data, key, value)
    return params


def encoded(img: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def good_folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_test_image(root / "ok" / f"good_{i}.png", seed=i)
    return root


def quarantine(layout: Layout) -> dict[str, tuple[str, str]]:
    frame = pd.read_csv(layout.quarantine, keep_default_na=False)
    return {row.path: (row.reason, row.detail) for row in frame.itertuples()}


def manifest(layout: Layout) -> pd.DataFrame:
    return pd.read_parquet(layout.manifest).set_index("path")


BAD_FILES: dict[str, tuple[str, Callable[[], bytes], str, dict[str, object]]] = {
    "zero-byte": ("empty.jpg", lambda: b"", "empty_file", {}),
    "truncated-jpeg": ("cut.jpg", lambda: encoded(noise(), "JPEG")[:600], "truncated_or_corrupt", {}),
    "truncated-png": ("cut.png", lambda: encoded(noise(), "PNG")[:1500], "truncated_or_corrupt", {}),
    "text-as-image": ("readme.png", lambda: b"this is a text file with an image extension\n", "not_an_image", {}),
    "decompression-bomb": ("huge.png", lambda: encoded(noise(120, 100), "PNG"), "decompression_bomb", {"max_pixels": 10_000}),
    "one-pixel": ("dot.png", lambda: encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too_small", {}),
    "absurd-aspect": ("strip.png", lambda: encoded(Image.new("L", (600, 10), 128), "PNG"), "bad_aspect_ratio", {}),
    "too-large-file": ("big.png", lambda: encoded(noise(64, 64), "PNG"), "file_too_large", {"max_file_bytes": 5_000}),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file_is_quarantined_and_run_continues(case: str, tmp_path: Path) -> None:
    name, make, reason, data_params = BAD_FILES[case]
    source = good_folder(tmp_path / "raw")
    (source / "ok" / name).write_bytes(make())
    layout = Layout(tmp_path / "project")

    summary = run_ingest(params_for(source, **data_params), layout)

    assert quarantine(layout).keys() == {f"ok/{name}"}
    assert quarantine(layout)[f"ok/{name}"][0] == reason
    assert summary.n_quarantined == 1 and summary.per_class == {"ok": 4}
    assert f"ok/{name}" not in manifest(layout).index


MODE_CASES: dict[str, tuple[Callable[[], Image.Image], str, str, str]] = {
    "cmyk-jpeg": (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", "CMYK", "RGB"),
    "16bit-png": (lambda: Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)), "PNG", "I;16", "L"),
    "palette-png": (lambda: noise(32, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", "P", "RGB"),
    "alpha-png": (lambda: Image.new("RGBA", (32, 32), (0, 0, 255, 128)), "PNG", "RGBA", "RGB"),
    "gray-png": (lambda: Image.new("L", (32, 32), 90), "PNG", "L", "L"),
}


@pytest.mark.parametrize("case", list(MODE_CASES), ids=list(MODE_CASES))
def test_unusual_modes_are_normalised_not_rejected(case: str, tmp_path: Path) -> None:
    make, fmt, source_mode, mode = MODE_CASES[case]
    source = good_folder(tmp_path / "raw", n=1)
    name = f"{case}.{'jpg' if fmt == 'JPEG' else 'png'}"
    (source / "ok" / name).write_bytes(encoded(make(), fmt))
    layout = Layout(tmp_path / "project")
    run_ingest(params_for(source), layout)

    row = manifest(layout).loc[f"ok/{name}"]
    assert (row["source_mode"], row["mode"], row["channels"]) == (source_mode, mode, 3 if mode == "RGB" else 1)
    assert 0 <= row["brightness"] <= 255 and row["contrast"] >= 0 and np.isfinite(row["sharpness"])
    if case == "cmyk-jpeg":
        assert row["mean_r"] > 240 and row["mean_g"] < 20  # red, not inverted or garbled
    if case == "alpha-png":
        assert row["mean_b"] > 250 and 120 < row["mean_r"] < 135  # half-transparent blue over white
    if case == "16bit-png":
        assert row["brightness"] > 5  # scaled from 16 bits, not clipped to black or white
    assert quarantine(layout) == {}


def test_exif_rotated_jpeg_has_orientation_applied(tmp_path: Path) -> None:
    source = good_folder(tmp_path / "raw", n=1)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise on display
    (source / "ok" / "phone.jpg").write_bytes(encoded(noise(64, 24), "JPEG", exif=exif.tobytes()))
    layout = Layout(tmp_path / "project")
    run_ingest(params_for(source), layout)
    row = manifest(layout).loc["ok/phone.jpg"]
    assert (row["width"], row["height"]) == (24, 64)


def test_unicode_and_spaces_in_names(tmp_path: Path) -> None:
    source = good_folder(tmp_path / "raw", n=1)
    write_test_image(source / "défaut fissuré" / "tuile n°1 (copie).png", seed=3)
    write_test_image(source / "ok" / "日本 語.jpg", seed=4)
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params_for(source), layout)
    rows = manifest(layout)
    assert rows.loc["défaut fissuré/tuile n°1 (copie).png", "label"] == "défaut fissuré"
    assert "ok/日本 語.jpg" in rows.index
    assert summary.per_class == {"défaut fissuré": 1, "ok": 2}


def test_symlinks_out_of_the_source_are_rejected_inside_ones_followed(tmp_path: Path) -> None:
    source = good_folder(tmp_path / "raw")
    secret = write_test_image(tmp_path / "elsewhere" / "secret.png", seed=9)
    (source / "ok" / "escape.png").symlink_to(secret)
    (source / "ok" / "alias.png").symlink_to(source / "ok" / "good_0.png")
    (source / "linked_class").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    layout = Layout(tmp_path / "project")
    run_ingest(params_for(source), layout)

    rejected = quarantine(layout)
    assert rejected["ok/escape.png"][0] == "symlink_outside_source"
    assert str(secret) in rejected["ok/escape.png"][1]
    assert rejected["linked_class"][0] == "symlink_outside_source"
    assert manifest(layout).loc["ok/alias.png", "sha256"] == manifest(layout).loc["ok/good_0.png", "sha256"]


def write_csv(path: Path, rows: list[str], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_manifest_rows_escaping_root_missing_or_duplicated_are_quarantined(tmp_path: Path) -> None:
    shoot = tmp_path / "shoot"
    for i in range(6):
        write_test_image(shoot / f"img{i}.png", seed=i)
    write_test_image(tmp_path / "private.png", seed=7)
    csv = write_csv(
        shoot / "labels.csv",
        [f"img{i}.png,ok" for i in range(6)]
        + ["../private.png,ok", f"{tmp_path / 'private.png'},ok", "gone.png,ok", "img0.png,crack", "img1.png,"],
    )
    layout = Layout(tmp_path / "project")
    summary = run_ingest(params_for(csv), layout)

    rejected = quarantine(layout)
    assert rejected["../private.png"][0] == "path_escapes_root"
    assert rejected[str(tmp_path / "private.png")][0] == "path_escapes_root"
    assert rejected["gone.png"][0] == "missing_file"
    assert rejected["img0.png"][0] == "duplicate_path"
    assert rejected["img1.png"][0] == "missing_label"
    assert summary.per_class == {"ok": 6}


def test_unknown_label_from_params_label_set(tmp_path: Path) -> None:
    shoot = tmp_path / "shoot"
    for i in range(5):
        write_test_image(shoot / f"img{i}.png", seed=i)
    csv = write_csv(shoot / "labels.csv", ["img0.png,ok", "img1.png,crack", "img2.png,ok", "img3.png,ok", "img4.png,dent"])
    params = params_for(csv)
    params.validate.labels = ["ok", "crack"]
    layout = Layout(tmp_path / "project")
    run_ingest(params, layout)
    reason, detail = quarantine(layout)["img4.png"]
    assert reason == "unknown_label" and "'dent'" in detail and "validate.labels" in detail


def test_unknown_label_from_pinned_label_lock(tmp_path: Path) -> None:
    source = good_folder(tmp_path / "raw")
    write_test_image(source / "scratch" / "new.png", seed=11)
    layout = Layout(tmp_path / "project")
    layout.root.mkdir()
    layout.labels_lock.write_text(json.dumps({"labels": ["ok", "crack"]}))
    run_ingest(params_for(source), layout)
    reason, detail = quarantine(layout)["scratch/new.png"]
    assert reason == "unknown_label" and "labels.lock.json" in detail


def test_missing_source_unsupported_source_and_csv_without_columns(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "project")
    with pytest.raises(SourceUnavailableError, match="'no/such/folder' does not exist"):
        run_ingest(params_for("no/such/folder"), layout)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataError, match="neither a folder .*, a .csv manifest nor an s3://bucket/prefix"):
        run_ingest(params_for(notes), layout)
    csv = write_csv(tmp_path / "m.csv", ["a.png,x"], header="file,class")
    with pytest.raises(DataError, match="missing path, label \\(found: file, class\\)"):
        run_ingest(params_for(csv), layout)
    only_bad = tmp_path / "only_bad"
    (only_bad / "ok").mkdir(parents=True)
    (only_bad / "ok" / "a.png").write_bytes(b"")
    params = params_for(only_bad)
    params.validate.max_bad_fraction = 1.0
    with pytest.raises(DataError, match="none of the 1 files .* is usable; top reasons: empty_file 1"):
        run_ingest(params, layout)
    empty = good_folder(tmp_path / "empty", n=0)
    empty.mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match="no images found"):
        run_ingest(params_for(empty), layout)
    assert not layout.manifest.exists()


def tree_fingerprint(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under root (not following directory links): content hash, mtime, symlink target."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            target = os.readlink(path) if path.is_symlink() else ""
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            entries[rel] = (digest, path.lstat().st_mtime_ns, target)
    return entries


def test_raw_data_is_never_modified_moved_or_deleted(tmp_path: Path) -> None:
    source = good_folder(tmp_path / "raw", n=8)
    outside = write_test_image(tmp_path / "elsewhere" / "secret.png", seed=9)
    for name, make, _reason, _ in BAD_FILES.values():
        (source / "crack" / name).parent.mkdir(parents=True, exist_ok=True)
        (source / "crack" / name).write_bytes(make())
    (source / "ok" / "escape.png").symlink_to(outside)
    (source / "ok" / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (32, 32)), "JPEG"))
    (source / "metadata.csv").write_text("path,site\nok/good_0.png,A\n")
    before, outside_before = tree_fingerprint(source), hashlib.sha256(outside.read_bytes()).hexdigest()

    params = params_for(source)
    params.validate.max_bad_fraction = 0.6
    layout = Layout(tmp_path / "project")
    run_ingest(params, layout)
    params.validate.max_bad_fraction = 0.0
    with pytest.raises(DataError):
        run_ingest(params, layout)  # a failing run must not touch the source either

    assert tree_fingerprint(source) == before
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == outside_before
    limit_free = {f"crack/{name}" for name, _, _, data_params in BAD_FILES.values() if not data_params}
    assert quarantine(layout).keys() == limit_free | {"ok/escape.png"}


def empty_folder(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def folder_of_bad_files(root: Path) -> Path:
    (root / "bad" / "ok").mkdir(parents=True)
    (root / "bad" / "ok" / "a.png").write_bytes(b"not an image")
    return root / "bad"


@pytest.mark.parametrize(
    ("make_source", "check_name", "problem"),
    [
        (lambda root: root / "absent", "source_readable", "does not exist"),
        (empty_folder, "source_usable", "no images found"),
        (folder_of_bad_files, "source_usable", "none of the 1 files"),
    ],
    ids=["missing", "empty", "every-file-quarantined"],
)
def test_a_source_that_stops_ingest_still_leaves_the_data_gate_report(
    make_source: Callable[[Path], Path], check_name: str, problem: str, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "proj")
    with pytest.raises(DataError, match=problem):
        run_ingest(params_for(make_source(tmp_path)), layout)
    report = json.loads(layout.validation_json.read_text())
    assert report["success"] is False and layout.validation_html.is_file()
    [failed] = report["checks"]
    assert failed["name"] == check_name and problem in failed["observed_value"] and failed["hint"]


def test_a_fifo_or_device_is_refused_without_blocking_and_growth_is_bounded(tmp_path: Path) -> None:
    """The reader checks the open file itself: a FIFO swapped in after listing does not hang, /dev/zero is not
    read without bound, and a file larger than data.max_file_bytes is not read past the limit."""
    from lensmith.errors import ImageRejected
    from lensmith.ingest import read_regular_file

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageRejected) as fifo_error:
        read_regular_file(fifo, 1024)
    assert fifo_error.value.reason == "not_a_file"
    with pytest.raises(ImageRejected) as device_error:
        read_regular_file(Path("/dev/zero"), 1024)
    assert device_error.value.reason == "not_a_file"
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageRejected) as size_error:
        read_regular_file(big, 1024)
    assert size_error.value.reason == "file_too_large"
    assert read_regular_file(big, 4096) == b"\0" * 4096
