"""`lensmith serve` as a real uvicorn process on 127.0.0.1 (free port): load, schema fuzzing, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from servekit import copy_project, jpeg_bytes, tiny_params

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOKEN = "process-token-456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    layout = copy_project(tmp_path_factory.mktemp("served"))
    params = layout.root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    port = free_port()
    log = open(layout.root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "lensmith.cli", "serve", "--model", str(layout.exported), "--host", "127.0.0.1",
         "--port", str(port), "--root", str(layout.root), "--params", str(params)],
        stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "LENSMITH_API_TOKEN": TOKEN},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{(layout.root / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("server never became ready")
        yield Server(url, layout.root, process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_eight_clients_two_hundred_requests_each_no_server_error(server: Server) -> None:
    images = [jpeg_bytes(i) for i in range(8)]

    def client(i: int) -> list[int]:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return [c.post("/v1/predict", files={"file": ("x.jpg", images[i], "image/jpeg")}).status_code for _ in range(200)]

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for result in pool.map(client, range(8)) for s in result]
    assert len(statuses) == 1600
    assert sum(s >= 500 for s in statuses) == 0
    assert set(statuses) == {200}


def test_schemathesis_finds_no_server_error(server: Server, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(cli), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "30",
         "--seed", "1", "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_responses_carry_no_server_header_or_trace(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/predict", files={"file": ("x.jpg", b"\xff\xd8broken", "image/jpeg")})
    assert r.status_code == 400 and "Traceback" not in r.text
    assert "uvicorn" not in r.headers.get("server", "")
    admin = httpx.post(f"{server.url}/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert admin.status_code == 200 and admin.json()["reloaded"] is True
