"""A real `prefect server start` on 127.0.0.1 with a free port and its own PREFECT_HOME (a session fixture)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from lensmith.testing import prefectapi
from lensmith.testing.prefectapi import PrefectServer, running_prefect_server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-home")
    try:
        with running_prefect_server(home) as server:
            yield server
    finally:
        shutil.rmtree(home, ignore_errors=True)


def api(server: PrefectServer, method: str, path: str, **kwargs):  # noqa: ANN201, ANN003
    return prefectapi.api(server.api_url, method, path, **kwargs)


def wait_for_deployment(server: PrefectServer, name: str, timeout_s: float = 120):  # noqa: ANN201
    return prefectapi.wait_for_deployment(server.api_url, name, timeout_s)


def wait_for_flow_run(server: PrefectServer, flow_run_id: str, timeout_s: float) -> str | None:
    return prefectapi.wait_for_flow_run(server.api_url, flow_run_id, timeout_s)
