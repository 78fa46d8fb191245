"""Artifacts by URI: a stage reads its deps from and writes its outs to a project on S3 (SeaweedFS)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lensmith.layout import Layout
from lensmith.params import load_params
from lensmith.remote import RemoteStageError, run_stage_at
from lensmith.stages import run_stage
from lensmith.testing.project import REPO
from tasks.pipeline import stage_io
from test_task_runner import split_project

UP_TO_VALIDATE = ("demo_data", "ingest", "validate")
SPLIT_INPUTS = ("data/manifest.parquet", "reports/validation.json")


def split_io(params):  # noqa: ANN001, ANN201
    return stage_io("split", params, REPO / "dvc.yaml")


def test_missing_input_at_uri_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    params = load_params(REPO / "params.yaml")
    with pytest.raises(RemoteStageError, match="needs data/manifest.parquet"):
        run_stage_at("split", (tmp_path / "store").as_uri(), params, tmp_path / "scratch", split_io(params))


def split_outputs_equal(remote: dict[str, bytes], local: Layout) -> None:
    for name in ("train", "val", "test"):
        got = pd.read_parquet(__import__("io").BytesIO(remote[f"data/splits/{name}.parquet"]))
        pd.testing.assert_frame_equal(got, pd.read_parquet(local.split_file(name)))
    assert json.loads(remote["reports/leakage.json"]) == json.loads((local.reports / "leakage.json").read_text())


@pytest.mark.slow
@pytest.mark.s3
def test_split_stage_on_s3_equals_local_run(tmp_path: Path, aws_env) -> None:  # noqa: ANN001
    root = split_project(tmp_path / "proj", [], stages=UP_TO_VALIDATE)
    params = load_params(root / "params.yaml")
    bucket = aws_env.make_bucket("remote-stage")
    client = aws_env.client()
    for rel in SPLIT_INPUTS:
        client.upload_file(str(root / rel), bucket, f"proj/{rel}")

    result = run_stage_at("split", f"s3://{bucket}/proj", params, tmp_path / "scratch", split_io(params))
    run_stage("split", params, Layout(root))  # the same stage on local disk

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="proj/")["Contents"])
    assert not [k for k in keys if ".tmp-" in k], keys
    written = {k.removeprefix("proj/"): client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    assert set(result.uploaded) <= set(written)
    assert {"data/splits/train.parquet", "data/splits/val.parquet", "data/splits/test.parquet", "reports/leakage.html"} <= set(written)
    split_outputs_equal(written, Layout(root))
    for name in ("train", "val", "test"):  # byte-identical, too
        assert written[f"data/splits/{name}.parquet"] == Layout(root).split_file(name).read_bytes()

    # a second run reads the persisted splits back from S3 (stable assignment) and rewrites the same bytes
    again = run_stage_at("split", f"s3://{bucket}/proj", params, tmp_path / "scratch2", split_io(params))
    assert "data/splits/train.parquet" in again.downloaded
    assert client.get_object(Bucket=bucket, Key="proj/data/splits/train.parquet")["Body"].read() == written["data/splits/train.parquet"]
