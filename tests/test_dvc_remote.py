"""DVC with an S3 remote on a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from lensmith.procutil import free_port
from lensmith.testing.project import make_project, run, tool_env
from tasks.vcs import RemoteError, dvc_transfer

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def dvc(root: Path, *args: str, env: dict[str, str], check: bool = True):  # noqa: ANN201
    return run([sys.executable, "-m", "dvc", *args], root, env=env, check=check)


def add_s3_remote(root: Path, bucket: str, endpoint: str, env: dict[str, str]) -> None:
    dvc(root, "remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore", env=env)
    dvc(root, "remote", "modify", "storage", "endpointurl", endpoint, env=env)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "ingested, with an S3 remote"], root)


@pytest.fixture
def s3_project(tmp_path: Path, s3_server) -> tuple[Path, dict[str, str]]:  # noqa: ANN001
    env = tool_env(s3_server.env)
    root = make_project(tmp_path / "proj", ["demo.per_class=8"])
    dvc(root, "repro", "ingest", env=env)
    add_s3_remote(root, s3_server.make_bucket("dvc"), s3_server.endpoint_url, env)
    return root, env


def test_push_then_clone_and_pull_restores_identical_data(s3_project, tmp_path: Path) -> None:  # noqa: ANN001
    root, env = s3_project
    dvc(root, "push", env=env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    dvc(clone, "pull", "--with-deps", "ingest", env=env)
    for sub in ("data/raw/demo", "data"):
        original = {k: v for k, v in tree_digest(root / sub).items() if not k.startswith(".")}
        restored = {k: v for k, v in tree_digest(clone / sub).items() if not k.startswith(".")}
        assert original and original == restored
    status = dvc(clone, "status", "--json", "--with-deps", "ingest", env=env)
    assert status.stdout.strip() == "{}"


def test_wrong_credentials_are_refused_clearly(s3_project, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    root, env = s3_project
    for key, value in {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RemoteError, match="dvc push to remote 'storage' failed"):
        dvc_transfer(root, "push", timeout_s=120)


def test_server_down_fails_clearly_keeps_local_data_and_next_push_works(s3_project, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    root, env = s3_project
    before = tree_digest(root / "data")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dvc(root, "remote", "modify", "storage", "endpointurl", f"http://127.0.0.1:{free_port()}", env=env)
    dvc(root, "remote", "modify", "storage", "connect_timeout", "2", env=env)
    with pytest.raises(RemoteError, match="failed"):
        dvc_transfer(root, "push", timeout_s=180)
    assert tree_digest(root / "data") == before
    run(["git", "checkout", "--", ".dvc/config"], root)
    assert dvc_transfer(root, "push", timeout_s=180).ran
