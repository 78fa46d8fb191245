"""The flow machine's side of `orchestration.artifact_store` (lensmith/remote.py): what is sent to the store, what
comes back, and the temporary keys a lost worker leaves (a folder as the store: the same fsspec calls as S3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensmith.params import load_params
from lensmith.remote import TEMPORARY_MARK, fetch_outputs, open_project, remove_temporary_keys, send_to_store
from lensmith.testing.project import REPO


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path: Path) -> tuple[object, str, Path]:
    (tmp_path / "store").mkdir()
    fs, base = open_project((tmp_path / "store").as_uri(), load_params(REPO / "params.yaml"))
    return fs, base, tmp_path / "store"


def test_only_missing_or_changed_files_are_sent_and_stale_ones_removed(tmp_path: Path, store) -> None:  # noqa: ANN001
    fs, base, folder = store
    root = tmp_path / "proj"
    write(root / "data/raw/a/1.txt", "one")
    write(root / "data/raw/a/2.txt", "two")
    assert send_to_store(fs, base, root, "data/raw") == ["data/raw/a/1.txt", "data/raw/a/2.txt"]
    assert send_to_store(fs, base, root, "data/raw") == []  # the store holds this version
    write(root / "data/raw/a/2.txt", "TWO")  # same size, other content: md5 decides
    (root / "data/raw/a/1.txt").unlink()
    assert send_to_store(fs, base, root, "data/raw") == ["data/raw/a/2.txt"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == ["data/raw/a/2.txt"]
    assert (folder / "data/raw/a/2.txt").read_text() == "TWO"


def test_outputs_come_back_replacing_and_pruning_the_local_copy(tmp_path: Path, store) -> None:  # noqa: ANN001
    fs, base, folder = store
    root = tmp_path / "proj"
    write(folder / "data/splits/train.parquet", "new train")
    write(folder / "reports/leakage.json", "{}")
    write(root / "data/splits/train.parquet", "old train")
    write(root / "data/splits/gone.parquet", "no longer an output")
    fetched = fetch_outputs(fs, base, root, ["data/splits", "reports/leakage.json"])
    assert fetched == ["data/splits/train.parquet", "reports/leakage.json"]
    assert (root / "data/splits/train.parquet").read_text() == "new train"
    assert not (root / "data/splits/gone.parquet").exists()
    assert not [p for p in root.rglob("*") if TEMPORARY_MARK in p.name]


def test_a_missing_output_is_named(tmp_path: Path, store) -> None:  # noqa: ANN001
    fs, base, _ = store
    with pytest.raises(Exception, match="holds no models/candidate/model.pt"):
        fetch_outputs(fs, base, tmp_path / "proj", ["models/candidate/model.pt"])


def test_temporary_keys_of_a_lost_writer_are_removed(store) -> None:  # noqa: ANN001
    fs, base, folder = store
    write(folder / "models/candidate/model.pt", "whole")
    write(folder / f"models/candidate/model.pt{TEMPORARY_MARK}0123abcd", "half")
    write(folder / f"data/splits/val.parquet{TEMPORARY_MARK}0123abcd", "half")
    write(folder / f"data/other.bin{TEMPORARY_MARK}0123abcd", "not this stage's")
    removed = remove_temporary_keys(fs, base, ["models/candidate/model.pt", "data/splits"])
    assert sorted(Path(r).name for r in removed) == [f"model.pt{TEMPORARY_MARK}0123abcd", f"val.parquet{TEMPORARY_MARK}0123abcd"]
    assert (folder / "models/candidate/model.pt").read_text() == "whole"
    assert (folder / f"data/other.bin{TEMPORARY_MARK}0123abcd").exists()


def test_artifact_store_must_be_a_uri() -> None:
    with pytest.raises(Exception, match="artifact_store"):
        load_params(REPO / "params.yaml", ["orchestration.artifact_store=bucket/prefix"])
    assert load_params(REPO / "params.yaml", ["orchestration.artifact_store=s3://b/p/"]).orchestration.artifact_store == "s3://b/p"
