"""Shared fixtures: offline switches, a real S3 server (SeaweedFS) and small real image folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

for _switch, _value in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
}.items():
    os.environ[_switch] = _value

from lensmith.testing.s3server import S3Server, start_s3_server, stop_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 (free ports, enforced credentials), stopped at session end.

    Use `s3_server.make_bucket()` for a fresh bucket, `s3_server.client()` for boto3 and
    `s3_server.env` for the AWS_* variables (e.g. `for k, v in s3_server.env.items(): monkeypatch.setenv(k, v)`).
    """
    server = start_s3_server()
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Point the standard AWS environment at the test server (and away from any ~/.aws profile)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def write_test_image(path: Path, *, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A small, real, seeded image (smooth gradient + noise, so stats and phash differ per seed)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * (1 + seed % 5) + yy * (2 + seed % 3)) % 256
    channels = [np.clip(base * k + rng.normal(0, 12, base.shape), 0, 255) for k in (1.0, 0.7, 0.4)]
    rgb = np.stack(channels, axis=-1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """ImageFolder with classes ok/crack (6 images each, PNG and JPEG) and a metadata.csv like the demo set."""
    root = tmp_path / "raw"
    lines = ["path,label,site,lighting,camera,batch"]
    for c, label in enumerate(("ok", "crack")):
        for i in range(6):
            ext = "png" if i % 2 == 0 else "jpg"
            rel = f"{label}/{label}_{i:02d}.{ext}"
            write_test_image(root / rel, seed=100 * c + i)
            lines.append(f"{rel},{label},{'AB'[i % 2]},{'dim' if i < 3 else 'bright'},cam{i % 3},{label}-{i // 2}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def thread_runner_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo project after `lensmith run` on the thread runner: the reference that the Dask and store-worker
    tests compare their runs with (one run for the session; tests read it and never write to it)."""
    import sys

    from lensmith.testing.project import make_project, run

    root = make_project(tmp_path_factory.mktemp("thread-runner") / "proj")
    run([sys.executable, "-m", "lensmith.cli", "run", "--set", "orchestration.task_runner=thread"], root, timeout=600)
    return root
