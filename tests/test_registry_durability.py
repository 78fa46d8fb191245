"""Registry durability (#16): fsynced atomic writes, a corrupt aliases.json is an error (never "no production"),
a stale gate decision is never promoted, and file permissions come from the umask without changing it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lensmith import fsutil
from lensmith.cli import app
from lensmith.fsutil import current_umask, write_json_atomic, write_text_atomic
from lensmith.gate import production_champion
from lensmith.layout import Layout
from lensmith.promotion import promote_if_passed
from lensmith.registry import Registry, RegistryError
from test_promotion import gated_candidate
from test_registry import make_candidate, register


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync and rename/replace, in order, as (what, path)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", fd_path(fd)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


# ---- fsync -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_syncs(monkeypatch)
    target = tmp_path / "out" / "doc.json"
    write_json_atomic(target, {"a": 1})
    renames = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path == str(target)]
    assert len(renames) == 1
    before, after = events[: renames[0]], events[renames[0] + 1 :]
    assert any(kind == "fsync" and Path(path).parent == target.parent and Path(path).name.startswith(".doc.json.") for kind, path in before)
    assert ("fsync", str(target.parent)) in after
    assert json.loads(target.read_text()) == {"a": 1}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_register_fsyncs_the_version_before_publishing_it(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_syncs(monkeypatch)
    version = register(registry, tmp_path, 0)
    published = str(registry.versions_dir / version)
    at = events.index(("rename", published))
    synced_before = {Path(path).name for kind, path in events[:at] if kind == "fsync" and Path(path).parent.name.startswith(f".{version}.")}
    assert {"model.pt", "model.onnx", "meta.json", "metrics.json", "gate.json", "MODEL_CARD.md"} <= synced_before
    assert ("fsync", str(registry.versions_dir)) in events[at + 1 :]
    aliases = registry.aliases_path
    assert ("fsync", str(aliases.parent)) in events[events.index(("rename", str(aliases))) + 1 :]


# ---- umask -----------------------------------------------------------------------------------------


def test_atomic_files_get_the_umask_permissions_without_the_umask_being_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(0o027)
    try:
        def no_umask_changes(mask: int) -> int:
            raise AssertionError("os.umask() called: it changes the process-wide umask for every thread")

        monkeypatch.setattr(os, "umask", no_umask_changes)
        assert current_umask() == 0o027
        write_text_atomic(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_the_umask_probe_fallback_agrees_with_the_real_umask() -> None:
    fsutil._probed_umask.cache_clear()
    try:
        assert fsutil._probed_umask() == current_umask() & 0o666
    finally:
        fsutil._probed_umask.cache_clear()


# ---- aliases.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [("", "not valid JSON"), ('{"production": "v00', "not valid JSON"), ("[]", "not a JSON object"),
     ('{"production": "../../etc"}', "not version ids")],
)
def test_a_corrupt_aliases_file_is_an_error_naming_the_file_and_the_fix(registry: Registry, tmp_path: Path, content: str, problem: str) -> None:
    registry.promote(register(registry, tmp_path, 0))
    registry.aliases_path.write_text(content)
    for call in (registry.aliases, lambda: registry.resolve("production"), lambda: production_champion(Layout(tmp_path))):
        with pytest.raises(RegistryError, match=problem) as info:
            call()
        assert str(registry.aliases_path) in str(info.value) and "git checkout" in str(info.value)
    result = CliRunner().invoke(app, ["models", "list", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "corrupt" in result.output and "Traceback" not in result.output


def test_an_unreadable_aliases_file_is_an_error_and_a_missing_one_means_a_new_registry(registry: Registry, tmp_path: Path) -> None:
    assert registry.aliases() == {"production": None, "previous": None, "candidate": None}
    registry.aliases_path.mkdir(parents=True)  # reading it fails with an OSError
    with pytest.raises(RegistryError, match="cannot read the registry aliases"):
        registry.aliases()


# ---- stale gate decisions --------------------------------------------------------------------------


def test_a_version_gated_against_an_older_production_is_not_promoted(registry: Registry, tmp_path: Path) -> None:
    v1 = register(registry, tmp_path, 0)
    registry.promote(v1)
    v2 = register(registry, tmp_path, 1)  # gated against v1
    v3 = register(registry, tmp_path, 2)  # gated against v1 as well
    registry.promote(v3)
    with pytest.raises(RegistryError, match="compared it against production v0001, but production is now v0003; rerun the gate"):
        registry.promote(v2)
    result = CliRunner().invoke(app, ["models", "promote", v2, "--root", str(tmp_path)])
    assert result.exit_code == 1 and "rerun the gate" in result.output
    assert registry.aliases()["production"] == v3
    forced = CliRunner().invoke(app, ["models", "promote", v2, "--allow-stale-gate", "--root", str(tmp_path)])
    assert forced.exit_code == 0, forced.output
    assert registry.aliases()["production"] == v2 and registry.aliases()["previous"] == v3


def test_a_floors_only_gate_is_stale_once_there_is_a_production(registry: Registry, tmp_path: Path) -> None:
    early = make_candidate(tmp_path, seed=5, champion=None)  # gated while there was no production
    registry.promote(register(registry, tmp_path, 0))
    version = registry.register(early["candidate"], metrics_path=early["metrics"], gate_path=early["gate"])  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="no production model \\(floors only\\), but production is now v0001"):
        registry.promote(version)
    registry.promote("v0001")  # already production: a no-op, never refused


def test_promote_if_passed_refuses_a_stale_gate_and_registers_nothing(tmp_path: Path) -> None:
    promote_if_passed(gated_candidate(tmp_path, weights=b"w1", passed=True))  # v0001 is production
    stale = gated_candidate(tmp_path, weights=b"w2", passed=True)
    doc = json.loads(stale.gate_json.read_text())
    doc["champion_version"] = None  # as if the gate ran before v0001 became production
    stale.gate_json.write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match="production is now v0001; rerun the gate"):
        promote_if_passed(stale)
    registry = Registry(stale.models)
    assert registry.version_ids() == ["v0001"] and registry.aliases()["production"] == "v0001"
    fresh = gated_candidate(tmp_path, weights=b"w2", passed=True)  # the gate rerun against v0001
    decision = promote_if_passed(fresh)
    assert (decision.version, decision.registered, decision.promoted) == ("v0002", True, True)
    assert promote_if_passed(fresh).promoted is False  # a rerun with nothing changed changes nothing


def test_weights_registered_with_a_stale_gate_register_again_after_a_new_gate(tmp_path: Path) -> None:
    promote_if_passed(gated_candidate(tmp_path, weights=b"w1", passed=True))
    layout = gated_candidate(tmp_path, weights=b"w2", passed=True)
    assert promote_if_passed(layout, promote=False).version == "v0002"  # gated against v0001, not promoted
    registry = Registry(layout.models)
    newest = gated_candidate(tmp_path, weights=b"w3", passed=True)
    promote_if_passed(newest)  # v0003 (gated against v0001) is production
    assert "already registered as v0003" in promote_if_passed(newest).note  # a no-op rerun: no stale-gate error
    with pytest.raises(RegistryError, match="rerun the gate"):
        registry.promote("v0002")
    regated = gated_candidate(tmp_path, weights=b"w2", passed=True)  # the gate rerun against v0003
    decision = promote_if_passed(regated)
    assert (decision.version, decision.registered, decision.promoted) == ("v0004", True, True)
