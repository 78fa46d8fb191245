"""Image shards (lensmith.shards): packing, reading in place, ingest from shards, train/evaluate through them."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import write_test_image
from lensmith.testing.project import REPO, TINY_OVERRIDES, run, tool_env
from lensmith.cli import app
from lensmith.datacache import cached_images
from lensmith.errors import DataError, ImageRejected
from lensmith.ingest import run_ingest
from lensmith.layout import Layout
from lensmith.params import Params, apply_overrides, params_from_dict, read_params_yaml
from lensmith.preprocess import Preprocessing
from lensmith.packing import pack_images
from lensmith.shards import INDEX_FILE, ImageRef, frame_image_refs, read_image_bytes, read_shard_index
from lensmith.sources import list_shard_folder

EXTENSIONS = [".jpg", ".png"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.glob("shard-*.tar"))}


def ref_of(folder: Path, row: pd.Series) -> ImageRef:
    return ImageRef(folder / row["shard"], int(row["offset"]), int(row["size"]), row["path"])


def ingest_params(source: Path, max_bad_fraction: float = 0.05) -> Params:
    return Params.model_validate({"data": {"source": str(source), "workers": 1}, "validate": {"max_bad_fraction": max_bad_fraction}})


# ---- packing and reading -------------------------------------------------------------------------------------


def test_pack_reads_back_byte_identical_and_is_a_plain_tar(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    summary = pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    assert [p.name for p in summary.new_shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert summary.n_added == 12 and "3 new shard(s)" in str(summary)
    index = read_shard_index(dest)
    assert index["path"].tolist() == sorted(index["path"])
    for _, row in index.iterrows():
        original = (tiny_image_folder / row["path"]).read_bytes()
        assert read_image_bytes(ref_of(dest, row), sha256=row["sha256"]) == original
    # a standard tar reader agrees on names, contents and data offsets; headers carry nothing machine-specific
    with tarfile.open(dest / "shard-00000.tar") as tar:
        members = tar.getmembers()
        first = index[index["shard"] == "shard-00000.tar"]
        assert [m.name for m in members] == first["path"].tolist()
        assert [m.offset_data for m in members] == first["offset"].tolist()
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}
        assert tar.extractfile(members[0]).read() == (tiny_image_folder / members[0].name).read_bytes()
    assert (dest / "metadata.csv").read_bytes() == (tiny_image_folder / "metadata.csv").read_bytes()


def test_repacking_the_same_images_gives_identical_bytes(tiny_image_folder: Path, tmp_path: Path) -> None:
    pack_images(tiny_image_folder, tmp_path / "a", extensions=EXTENSIONS, shard_images=4)
    pack_images(tiny_image_folder, tmp_path / "b", extensions=EXTENSIONS, shard_images=4)
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b") != {}
    assert sha(tmp_path / "a" / INDEX_FILE) == sha(tmp_path / "b" / INDEX_FILE)


def test_packing_again_appends_new_shards_and_never_rewrites_old_ones(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    before = shard_digests(dest)
    index_before = sha(dest / INDEX_FILE)

    nothing = pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    assert nothing.new_shards == [] and nothing.n_unchanged == 12
    assert sha(dest / INDEX_FILE) == index_before and shard_digests(dest) == before

    for i in range(3):
        write_test_image(tiny_image_folder / "ok" / f"new_{i}.png", seed=900 + i)
    write_test_image(tiny_image_folder / "crack" / "crack_00.png", seed=777)  # same path, new content
    summary = pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    assert (summary.n_added, summary.n_updated, summary.n_unchanged) == (3, 1, 11)
    assert [p.name for p in summary.new_shards] == ["shard-00003.tar"]
    after = shard_digests(dest)
    assert {k: after[k] for k in before} == before
    index = read_shard_index(dest)
    assert len(index) == 15 and not index["path"].duplicated().any()
    changed = index.set_index("path").loc["crack/crack_00.png"]
    assert changed["shard"] == "shard-00003.tar"
    assert read_image_bytes(ImageRef(dest / changed["shard"], int(changed["offset"]), int(changed["size"]))) == (
        tiny_image_folder / "crack" / "crack_00.png"
    ).read_bytes()


def test_shard_size_in_bytes_splits_too(tiny_image_folder: Path, tmp_path: Path) -> None:
    one_image = max(p.stat().st_size for p in tiny_image_folder.rglob("*.png"))
    summary = pack_images(tiny_image_folder, tmp_path / "s", extensions=EXTENSIONS, shard_bytes=one_image)
    assert len(summary.new_shards) == 12


def test_pack_refuses_a_shard_folder_and_a_missing_folder(tiny_image_folder: Path, tmp_path: Path) -> None:
    pack_images(tiny_image_folder, tmp_path / "s", extensions=EXTENSIONS)
    with pytest.raises(DataError, match="already a shard folder"):
        pack_images(tmp_path / "s", tmp_path / "t", extensions=EXTENSIONS)
    with pytest.raises(DataError, match="not a folder"):
        pack_images(tmp_path / "nope", tmp_path / "t", extensions=EXTENSIONS)


def test_cli_pack_prints_what_it_wrote(tiny_image_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["pack", str(tiny_image_folder), str(tmp_path / "s"), "--shard-images", "6", "--params", str(tmp_path / "none.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "12 new and 0 changed images -> 2 new shard(s)" in result.output and "shard-00001.tar" in result.output


# ---- damaged shards ----------------------------------------------------------------------------------------------


def test_truncated_shard_and_corrupt_member_are_clear_errors(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=12)
    index = read_shard_index(dest)
    last, first = index.iloc[-1], index.iloc[0]
    shard = dest / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    data[int(first["offset"]) + 40] ^= 0xFF
    shard.write_bytes(bytes(data[: int(last["offset"]) + 10]))
    with pytest.raises(ImageRejected, match=r"shard-00000.tar member .*ok_05.jpg.* ends after 10 of"):
        read_image_bytes(ref_of(dest, last))
    with pytest.raises(ImageRejected, match=r"corrupt_shard_member: .*shard-00000.tar member crack/crack_00.png"):
        read_image_bytes(ref_of(dest, first), sha256=first["sha256"])
    pre = Preprocessing(image_size=16, resize=16)
    with pytest.raises(DataError, match=r"cannot be decoded: .*shard-00000.tar member .*ok_05.jpg"):
        cached_images([ref_of(dest, last)], ["x"], pre, tmp_path / "cache")


def test_ingest_quarantines_damaged_members_and_missing_shards(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=6)
    index = read_shard_index(dest)
    first = index.iloc[0]
    shard = dest / first["shard"]
    data = bytearray(shard.read_bytes())
    data[int(first["offset"]) + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    last_shard = dest / index.iloc[-1]["shard"]
    last_shard.write_bytes(last_shard.read_bytes()[: int(index.iloc[-1]["offset"]) + 5])
    layout = Layout(tmp_path / "proj")
    run_ingest(ingest_params(dest, max_bad_fraction=0.5), layout)
    quarantine = pd.read_csv(layout.quarantine).set_index("path")
    assert quarantine.loc[first["path"], "reason"] == "corrupt_shard_member"
    assert quarantine.loc[index.iloc[-1]["path"], "reason"] == "truncated_shard"
    assert str(last_shard) in quarantine.loc[index.iloc[-1]["path"], "detail"]
    last_shard.unlink()
    run_ingest(ingest_params(dest, max_bad_fraction=0.6), layout)
    reasons = pd.read_csv(layout.quarantine)["reason"].value_counts().to_dict()
    assert reasons == {"missing_shard": 6, "corrupt_shard_member": 1}


def test_listing_applies_the_folder_rules_to_member_paths(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS)
    index = read_shard_index(dest)
    good = index.iloc[0].to_dict()
    bad_paths = ["/etc/passwd.png", "ok/../../x.png", "ok/.hidden.png", ".git/x.png", "ok/notes.txt", "loose.png"]
    rows = [{**good, "path": p} for p in bad_paths] + [{**good, "shard": "../shard-00000.tar", "path": "ok/z.png"}]
    rows.append({**good, "shard": "shard-00009.tar", "path": "ok/gone.png"})
    pd.concat([index, pd.DataFrame(rows)]).to_parquet(dest / INDEX_FILE, index=False)
    listing = list_shard_folder(dest, set(EXTENSIONS))
    reasons = {r.path: r.reason for r in listing.rejections}
    assert reasons == {
        "/etc/passwd.png": "path_escapes_root",
        "ok/../../x.png": "path_escapes_root",
        "ok/notes.txt": "unsupported_extension",
        "loose.png": "no_label",
        "ok/z.png": "path_escapes_root",
        "ok/gone.png": "missing_shard",
    }
    assert len(listing.items) == 12 and {i.label for i in listing.items} == {"ok", "crack"}
    assert listing.metadata is not None and len(listing.metadata) == 12


def test_loose_image_files_beside_the_shards_are_listed_as_files(tiny_image_folder: Path, tmp_path: Path) -> None:
    """What `lensmith review import` writes into data.source must not vanish when the source is shards."""
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS)
    write_test_image(dest / "ok" / "reviewed-1" / "abc.png", seed=500)
    shutil.copy(tiny_image_folder / "ok" / "ok_00.png", dest / "ok" / "ok_00.png")
    listing = list_shard_folder(dest, set(EXTENSIONS))
    loose = [i for i in listing.items if not i.in_shard]
    assert [(i.path, i.label) for i in loose] == [("ok/reviewed-1/abc.png", "ok")]
    assert [(r.path, r.reason) for r in listing.rejections] == [("ok/ok_00.png", "duplicate_path")]
    assert len(listing.items) == 13


def test_unreadable_index_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / INDEX_FILE).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not readable parquet"):
        read_shard_index(tmp_path / "s")


# ---- ingest and the stages that read images -----------------------------------------------------------------------


def test_ingest_from_shards_matches_ingest_from_the_folder(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    folder_layout, shard_layout = Layout(tmp_path / "p1"), Layout(tmp_path / "p2")
    from_folder = run_ingest(ingest_params(tiny_image_folder), folder_layout)
    from_shards = run_ingest(ingest_params(dest), shard_layout)
    assert from_shards.per_class == from_folder.per_class == {"crack": 6, "ok": 6}
    a, b = pd.read_parquet(folder_layout.manifest), pd.read_parquet(shard_layout.manifest)
    same = [c for c in a.columns if c not in ("file", "mtime_ns", "member_offset", "member_size", "source")]
    pd.testing.assert_frame_equal(a[same], b[same])
    assert a["member_offset"].isna().all() and b["member_offset"].notna().all()
    assert (b["member_size"] == b["file_bytes"]).all()
    assert set(b["file"].map(lambda f: Path(f).name)) == {"shard-00000.tar", "shard-00001.tar", "shard-00002.tar"}
    for ref, expected in zip(frame_image_refs(b, shard_layout.root), a["path"]):
        assert read_image_bytes(ref) == (tiny_image_folder / expected).read_bytes()
    again = run_ingest(ingest_params(dest), shard_layout)
    assert (again.n_read, again.n_reused) == (0, 12)
    pd.testing.assert_frame_equal(pd.read_parquet(shard_layout.manifest), b)


def test_training_cache_is_the_same_from_shards_and_from_files(tiny_image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    pack_images(tiny_image_folder, dest, extensions=EXTENSIONS, shard_images=5)
    layouts = {"folder": Layout(tmp_path / "p1"), "shards": Layout(tmp_path / "p2")}
    run_ingest(ingest_params(tiny_image_folder), layouts["folder"])
    run_ingest(ingest_params(dest), layouts["shards"])
    pre = Preprocessing(image_size=24, resize=24)
    arrays = {}
    for kind, layout in layouts.items():
        frame = pd.read_parquet(layout.manifest)
        arrays[kind] = np.asarray(cached_images(frame_image_refs(frame, layout.root), frame["sha256"].tolist(), pre, tmp_path / f"cache-{kind}"))
    assert arrays["folder"].shape == (12, 3, 24, 24)
    assert np.array_equal(arrays["folder"], arrays["shards"])


def tiny_pipeline_params(source: Path) -> Params:
    overrides = TINY_OVERRIDES + [
        f"data.source={source}",
        "data.workers=1",
        "validate.required_metadata=[]",
        "train.pretrained=false",
        "train.num_threads=1",
        "train.epochs=1",
        "train.image_size=32",
        "evaluate.robustness.perturbations=[blur]",
        "evaluate.slices=[]",
    ]
    return params_from_dict(apply_overrides(read_params_yaml(REPO / "params.yaml"), overrides), "shard pipeline test")


@pytest.mark.slow
def test_demo_shards_through_ingest_split_train_evaluate(tmp_path: Path) -> None:
    from lensmith.demodata import generate_demo_dataset
    from lensmith.evaluate import run_evaluate
    from lensmith.export import run_export
    from lensmith.params import ExportParams
    from lensmith.split import run_split
    from lensmith.train import run_train

    raw = tmp_path / "proj" / "data" / "raw" / "demo"
    summary = generate_demo_dataset(raw, sites=None, seed=0, per_class=12, image_size=64, workers=1, shards=True)
    assert summary.shards and (raw / INDEX_FILE).is_file() and not list(raw.rglob("*.jpg"))
    params, layout = tiny_pipeline_params(raw), Layout(tmp_path / "proj")
    ingested = run_ingest(params, layout)
    assert ingested.n_images == summary.n_images and ingested.n_quarantined == 0
    run_split(params, layout)
    test_split = pd.read_parquet(layout.split_file("test"))
    assert test_split["member_offset"].notna().all() and test_split["file"].str.endswith(".tar").all()
    run_train(params, layout)
    run_export(params.model_copy(update={"export": ExportParams(int8=False, bench_seconds=0.1)}), layout)
    evaluation = run_evaluate(params, layout)  # of the exported model, reading images from the shards
    assert evaluation.n_test == len(test_split)
    assert (layout.reports / "metrics.json").is_file()


# ---- DVC -----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.s3
def test_dvc_pushes_only_the_new_shards(tiny_image_folder: Path, tmp_path: Path, s3_server) -> None:  # noqa: ANN001
    env = tool_env(s3_server.env)
    root = tmp_path / "repo"
    root.mkdir()

    def dvc(*args: str) -> str:
        return run([sys.executable, "-m", "dvc", *args], root, env=env).stdout

    run(["git", "init", "-q"], root)
    dvc("init", "-q")
    dvc("remote", "add", "-d", "s3", f"s3://{s3_server.make_bucket('shards')}/store")
    dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint_url)
    pack_images(tiny_image_folder, root / "shards", extensions=EXTENSIONS, shard_images=5)
    dvc("add", "shards")
    assert "6 files pushed" in dvc("push")  # 3 shards, index, metadata.csv and DVC's directory listing

    write_test_image(tiny_image_folder / "ok" / "new.png", seed=999)
    pack_images(tiny_image_folder, root / "shards", extensions=EXTENSIONS, shard_images=5)
    dvc("add", "shards")
    assert "3 files pushed" in dvc("push")  # the new shard, the new index and the new directory listing

    before = {p.name: sha(p) for p in (root / "shards").iterdir()}
    shutil.rmtree(root / "shards")
    shutil.rmtree(root / ".dvc" / "cache")
    dvc("pull")
    assert {p.name: sha(p) for p in (root / "shards").iterdir()} == before
    index = read_shard_index(root / "shards")
    assert read_image_bytes(ref_of(root / "shards", index.iloc[0]), sha256=index.iloc[0]["sha256"])
