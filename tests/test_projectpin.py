"""A deployed flow runs only the project its worker is pinned to: `root`/`params_file` run parameters cannot send
the worker to another dvc.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lensmith.projectpin import ALLOWED_ROOTS_ENV, ROOT_ENV, ProjectNotAllowedError, pinned_project


def test_nothing_pinned_allows_any_project_but_params_stay_inside(tmp_path: Path) -> None:
    root, params = pinned_project(str(tmp_path), "params.yaml", environ={})
    assert (root, params) == (tmp_path.resolve(), tmp_path.resolve() / "params.yaml")
    with pytest.raises(ProjectNotAllowedError, match="outside the project"):
        pinned_project(str(tmp_path), "../elsewhere/params.yaml", environ={})
    with pytest.raises(ProjectNotAllowedError, match="outside the project"):
        pinned_project(str(tmp_path), "/etc/params.yaml", environ={})


def test_a_pinned_worker_refuses_another_root(tmp_path: Path) -> None:
    pinned, other, extra = tmp_path / "plant", tmp_path / "attacker", tmp_path / "lab"
    env = {ROOT_ENV: str(pinned), ALLOWED_ROOTS_ENV: os.pathsep.join([str(extra), ""])}
    assert pinned_project(str(pinned), "params.yaml", env)[0] == pinned.resolve()
    assert pinned_project(str(extra), "params.yaml", env)[0] == extra.resolve()
    with pytest.raises(ProjectNotAllowedError, match="not one this worker runs"):
        pinned_project(str(other), "params.yaml", env)
    with pytest.raises(ProjectNotAllowedError):
        pinned_project(str(pinned / ".." / "attacker"), "params.yaml", env)


def test_symlinked_roots_compare_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert pinned_project(str(tmp_path / "link"), "params.yaml", {ROOT_ENV: str(real)})[0] == real


@pytest.mark.timeout(600)
def test_a_deployed_flow_refuses_a_root_it_is_not_pinned_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real flow run: it fails before reading the other project's params or running anything."""
    from flows.monitoring import monitoring_flow

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "plant"))
    other = tmp_path / "attacker"
    other.mkdir()
    (other / "params.yaml").write_text("this: [is not read")
    with pytest.raises(ProjectNotAllowedError, match="not one this worker runs"):
        monitoring_flow(root=str(other), params_file="params.yaml")
