"""Ingest from s3://bucket/prefix against a real S3 server (SeaweedFS, enforced credentials)."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_test_image
from lensmith.testing.s3server import S3Server
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import SourceUnavailableError
from lensmith.ingest import run_ingest
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.sources import resolve_local_files

pytestmark = pytest.mark.s3


def s3_params(uri: str, endpoint: str | None, workers: int = 1) -> Params:
    params = Params()
    params.data.source = uri
    params.data.s3_endpoint_url = endpoint
    params.data.workers = workers
    return params


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ingest_from_s3_prefix_end_to_end(aws_env: S3Server, tiny_image_folder: Path, tmp_path: Path) -> None:
    for i in range(24):  # enough objects for the process pool (workers fetch with their own clients)
        write_test_image(tiny_image_folder / "ok" / f"extra {i:02d} é.png", seed=500 + i, size=(24, 24))
    bucket = aws_env.make_bucket("ingest")
    aws_env.upload_tree(tiny_image_folder, bucket, "datasets/tiles")
    layout = Layout(tmp_path / "project")
    params = s3_params(f"s3://{bucket}/datasets/tiles", aws_env.endpoint_url, workers=2)

    summary = run_ingest(params, layout)
    manifest = pd.read_parquet(layout.manifest)
    assert summary.per_class == {"crack": 6, "ok": 30} and summary.n_read == 36
    row = manifest.set_index("path").loc[f"s3://{bucket}/datasets/tiles/ok/ok_00.png"]
    assert row["file"] == f".cache/s3/{bucket}/datasets/tiles/ok/ok_00.png"
    assert row["site"] == "A" and row["camera"] == "cam0" and row["etag"]
    mirror = layout.root / row["file"]
    assert hashlib.sha256(mirror.read_bytes()).hexdigest() == row["sha256"]
    assert mirror.read_bytes() == (tiny_image_folder / "ok" / "ok_00.png").read_bytes()
    assert f"s3://{bucket}/datasets/tiles/ok/extra 05 é.png" in set(manifest["path"])

    again = run_ingest(params, layout)
    assert (again.n_read, again.n_reused) == (0, 36)

    mirror.unlink()  # training resolves files through the manifest and refetches lost mirror files
    files = resolve_local_files(pd.read_parquet(layout.manifest), params, layout)
    assert mirror in files and hashlib.sha256(mirror.read_bytes()).hexdigest() == row["sha256"]


def test_wrong_credentials_are_refused_with_a_clear_message(
    aws_env: S3Server, tiny_image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = aws_env.make_bucket("auth")
    aws_env.upload_tree(tiny_image_folder, bucket, "p")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    project = tmp_path / "project"
    project.mkdir()
    result = CliRunner().invoke(
        app,
        ["ingest", "--root", str(project), "--params", str(project / "params.yaml"),
         "--set", f"data.source=s3://{bucket}/p", "--set", f"data.s3_endpoint_url={aws_env.endpoint_url}"],
    )
    assert result.exit_code == 1
    message = result.output.strip()
    assert "refused" in message and "SignatureDoesNotMatch" in message
    assert aws_env.endpoint_url in message and bucket in message
    assert "Traceback" not in result.output and len(message.splitlines()) == 1
    assert not (project / "data" / "manifest.parquet").exists()


def test_unknown_access_key_and_missing_bucket(aws_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout(tmp_path / "project")
    with pytest.raises(SourceUnavailableError, match=r"bucket 'no-such-bucket-here' does not exist at http://127\.0\.0\.1"):
        run_ingest(s3_params("s3://no-such-bucket-here/x", aws_env.endpoint_url), layout)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(SourceUnavailableError, match="refused.*InvalidAccessKeyId"):
        run_ingest(s3_params("s3://anything/x", aws_env.endpoint_url), layout)


def test_unreachable_endpoint_fails_fast_and_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError) as caught:
        run_ingest(s3_params("s3://tiles/prefix", endpoint), Layout(tmp_path / "project"))
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith(f"cannot reach S3 endpoint {endpoint} for s3://tiles/prefix/")
    assert "\n" not in message


def test_a_drift_window_lists_and_reads_a_flat_prefix(aws_env: S3Server, tiny_image_folder: Path, tmp_path: Path) -> None:
    """Objects right under the prefix (no <class>/ folder) are an unlabelled window, read like any other object."""
    from lensmith.drift.current import decoded_chunks, list_window
    from lensmith.preprocess import Preprocessing

    bucket = aws_env.make_bucket("flatwindow")
    client = aws_env.client()
    for file in sorted(tiny_image_folder.rglob("*.png"))[:4]:
        client.upload_file(str(file), bucket, f"window/{file.parent.name}-{file.name}")
    params = s3_params(f"s3://{bucket}/window", aws_env.endpoint_url)
    listing = list_window(params.data.source, params, Layout(tmp_path))
    assert len(listing.items) == 4 and not listing.rejections
    assert {item.label for item in listing.items} == {""} and all(not item.key.endswith("/") for item in listing.items)
    chunks = list(decoded_chunks(listing.items, params, Preprocessing(image_size=32, resize=36), workers=1))
    assert sum(len(c.rows) for c in chunks) == 4 and not [r for c in chunks for r in c.rejections]
