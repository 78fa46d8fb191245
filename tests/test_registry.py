"""Model registry: immutable versions, aliases, promotion refusals, rollback speed, atomic register, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lensmith.cli import app
from lensmith.errors import LensmithError
from lensmith.registry import Registry, RegistryError

CLASSES = ["crack", "ok", "scratch"]


def metrics_doc(macro_f1: float = 0.9) -> dict[str, Any]:
    return {
        "test": {
            "accuracy": macro_f1 + 0.01,
            "macro_f1": macro_f1,
            "per_class": {c: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 50} for c in CLASSES},
            "positive_class": {"name": "crack", "recall": 0.9, "precision": 0.9, "roc_auc": 0.97, "average_precision": 0.95},
        },
        "calibration": {"ece": 0.03},
        "slices": {"site": {"values": {"A": {"n": 40, "accuracy": 0.91}, "B": {"n": 40, "accuracy": 0.88}}, "equalized_odds_gap": 0.03}},
        "robustness": {
            "clean_accuracy": 0.91,
            "mean_relative_drop": 0.05,
            "perturbations": {"blur": {"1": {"accuracy": 0.9, "relative_drop": 0.01}, "5": {"accuracy": 0.7, "relative_drop": 0.23}}},
        },
    }


def gate_doc(passed: bool, weights: str | None = None, champion: str | None = None) -> dict[str, Any]:
    """A gate decision as `lensmith gate` writes it; `champion`: the production it compared against."""
    return {
        "passed": passed,
        "decision": "promote" if passed else "reject",
        "reasons": [] if passed else ["floor.min_positive_recall: 0.5000 is not >= 0.8000"],
        "champion_version": champion,
        "warnings": [],
        "candidate": {"weights_sha256": weights},
        "checks": [],
    }


def make_candidate(
    root: Path, *, seed: int = 0, passed: bool | None = True, macro_f1: float = 0.9, champion: str | None = None
) -> dict[str, Path | None]:
    """A candidate folder + metrics.json (+ gate.json, gated against `champion`, unless passed is None) under `root`."""
    candidate = root / f"candidate{seed}"
    candidate.mkdir(parents=True)
    weights = f"weights-{seed}".encode()
    (candidate / "model.pt").write_bytes(weights)
    (candidate / "model.onnx").write_bytes(b"onnx-" + weights)
    sha = hashlib.sha256(weights).hexdigest()
    meta = {
        "arch": "efficientnet_lite0",
        "classes": CLASSES,
        "preprocessing": {"image_size": 128},
        "params": {"train": {"lr": 0.001, "epochs": 8, "augment": {"hflip": True}}},
        "data_hash": {"data/splits/test.parquet": "t" * 64, "combined": "c" * 64},
        "git_commit": "abc123",
        "weights_sha256": sha,
        "timings": {"train_s": 1.0},
    }
    (candidate / "meta.json").write_text(json.dumps(meta))
    metrics = root / f"metrics{seed}.json"
    metrics.write_text(json.dumps(metrics_doc(macro_f1)))
    gate = None
    if passed is not None:
        gate = root / f"gate{seed}.json"
        gate.write_text(json.dumps(gate_doc(passed, sha, champion)))
    return {"candidate": candidate, "metrics": metrics, "gate": gate}


def register(registry: Registry, root: Path, seed: int, passed: bool | None = True) -> str:
    """Register a candidate gated against the current production (as the pipeline does: gate, then register)."""
    c = make_candidate(root, seed=seed, passed=passed, champion=registry.aliases()["production"])
    return registry.register(c["candidate"], metrics_path=c["metrics"], gate_path=c["gate"])  # type: ignore[arg-type]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def test_register_builds_a_complete_read_only_version(registry: Registry, tmp_path: Path) -> None:
    version = register(registry, tmp_path, 0)
    folder = registry.resolve(version)
    assert version == "v0001"
    assert folder == tmp_path / "models" / "registry" / "versions" / "v0001"
    names = {p.name for p in folder.iterdir()}
    assert {"model.pt", "model.onnx", "meta.json", "metrics.json", "gate.json", "MODEL_CARD.md", "MODEL_CARD.html"} <= names
    assert "model.int8.onnx" not in names
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["version"] == "v0001" and meta["parent_version"] is None and meta["created"]
    assert meta["classes"] == CLASSES and meta["git_commit"] == "abc123"
    assert meta["data_hash"]["combined"] == "c" * 64 and meta["params"]["train"]["lr"] == 0.001
    assert meta["metrics"]["macro_f1"] == pytest.approx(0.9)
    assert registry.aliases() == {"production": None, "previous": None, "candidate": "v0001"}
    assert json.loads((tmp_path / "models" / "registry" / "aliases.json").read_text())["candidate"] == "v0001"


def test_model_card_covers_use_data_metrics_slices_robustness_limits_params(registry: Registry, tmp_path: Path) -> None:
    card = (registry.resolve(register(registry, tmp_path, 0)) / "MODEL_CARD.md").read_text()
    for heading in ("Intended use", "Data", "Metrics", "Per-slice results", "Robustness", "Known limits", "Training parameters"):
        assert f"## {heading}" in card
    assert "c" * 64 in card  # data hash
    assert "site=B" in card and "worst perturbation: blur at severity 5" in card
    assert "augment.hflip" in card
    html = (registry.resolve("candidate") / "MODEL_CARD.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_versions_are_sortable_and_parent_is_production(registry: Registry, tmp_path: Path) -> None:
    first = register(registry, tmp_path, 0)
    registry.promote(first)
    second = register(registry, tmp_path, 1)
    assert (first, second) == ("v0001", "v0002")
    assert registry.show(second)["meta"]["parent_version"] == "v0001"
    assert [i.version for i in registry.list_versions()] == ["v0001", "v0002"]


def test_promote_moves_production_to_previous_and_rollback_is_fast(registry: Registry, tmp_path: Path) -> None:
    v1 = register(registry, tmp_path, 0)
    registry.promote(v1)
    v2 = register(registry, tmp_path, 1)
    registry.promote(v2)
    assert registry.aliases()["production"] == v2 and registry.aliases()["previous"] == v1
    start = time.perf_counter()
    restored = registry.rollback()
    elapsed = time.perf_counter() - start
    assert restored == v1 and elapsed < 1.0
    assert registry.resolve("production").name == v1 and registry.aliases()["previous"] == v2
    infos = {i.version: i for i in registry.list_versions()}
    assert "production" in infos[v1].aliases and "previous" in infos[v2].aliases


def test_rollback_without_previous_is_a_clear_error(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no previous"):
        registry.rollback()
    registry.promote(register(registry, tmp_path, 0))
    with pytest.raises(RegistryError, match="no previous"):
        registry.rollback()


def test_rejected_or_ungated_versions_are_never_promoted(registry: Registry, tmp_path: Path) -> None:
    good = register(registry, tmp_path, 0)
    registry.promote(good)
    rejected = register(registry, tmp_path, 1, passed=False)
    ungated = register(registry, tmp_path, 2, passed=None)
    with pytest.raises(RegistryError, match="gate rejected it"):
        registry.promote(rejected)
    with pytest.raises(RegistryError, match="no gate.json"):
        registry.promote(ungated)
    assert registry.aliases()["production"] == good and registry.aliases()["previous"] is None


def test_unknown_versions_and_unset_aliases_are_clear_errors(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="alias 'production' is not set"):
        registry.resolve("production")
    register(registry, tmp_path, 0)
    for name in ("v0042", "latest", "../versions"):
        with pytest.raises(RegistryError, match="unknown model version or alias"):
            registry.resolve(name)
    with pytest.raises(RegistryError, match="unknown"):
        registry.promote("v0042")
    assert issubclass(RegistryError, LensmithError)


def test_a_failure_mid_register_leaves_no_half_version(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lensmith.registry

    def broken_card(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lensmith.registry, "write_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        register(registry, tmp_path, 0)
    assert list(registry.versions_dir.iterdir()) == []  # neither a version nor a staging folder
    assert registry.aliases()["candidate"] is None
    monkeypatch.undo()
    killed = registry.versions_dir / ".v0001.killed"  # what a register killed mid-copy leaves
    killed.mkdir()
    (killed / "model.pt").write_bytes(b"half")
    assert register(registry, tmp_path, 1) == "v0001"
    assert sorted(p.name for p in registry.versions_dir.iterdir()) == ["v0001"]


def test_registered_versions_cannot_be_overwritten_through_the_api(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = register(registry, tmp_path, 0)
    before = tree_digest(registry.resolve(v1))
    registry.promote(v1)
    register(registry, tmp_path, 1)
    registry.promote("v0002")
    registry.rollback()
    monkeypatch.setattr(Registry, "_next_version_id", lambda self: v1)  # force an id collision
    with pytest.raises(RegistryError, match="immutable"):
        register(registry, tmp_path, 2)
    assert tree_digest(registry.resolve(v1)) == before
    assert sorted(p.name for p in registry.versions_dir.iterdir()) == ["v0001", "v0002"]


def test_a_gate_report_for_other_weights_is_refused(registry: Registry, tmp_path: Path) -> None:
    c = make_candidate(tmp_path, seed=0)
    (c["candidate"] / "model.pt").write_bytes(b"retrained")  # type: ignore[operator]
    meta = json.loads((c["candidate"] / "meta.json").read_text())  # type: ignore[operator]
    meta["weights_sha256"] = hashlib.sha256(b"retrained").hexdigest()
    (c["candidate"] / "meta.json").write_text(json.dumps(meta))  # type: ignore[operator]
    with pytest.raises(RegistryError, match="other weights"):
        registry.register(c["candidate"], metrics_path=c["metrics"], gate_path=c["gate"])  # type: ignore[arg-type]


def test_onnx_files_and_export_report_are_stored(registry: Registry, tmp_path: Path) -> None:
    c = make_candidate(tmp_path, seed=0)
    candidate: Path = c["candidate"]  # type: ignore[assignment]
    for name in ("model.int8.onnx", "model.opt.onnx"):
        (candidate / name).write_bytes(name.encode())
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"serving_variant": "int8"}))
    version = registry.register(candidate, metrics_path=c["metrics"], gate_path=c["gate"], export_path=export)  # type: ignore[arg-type]
    files = registry.show(version)["files"]
    assert {"model.pt", "model.onnx", "model.opt.onnx", "model.int8.onnx", "export.json"} <= set(files)
    (candidate / "export.json").write_text(json.dumps({"serving_variant": "fp32"}))  # the export stage's copy
    version = registry.register(candidate, metrics_path=c["metrics"], gate_path=c["gate"])  # type: ignore[arg-type]
    assert json.loads((registry.resolve(version) / "export.json").read_text())["serving_variant"] == "fp32"


def test_an_export_report_for_other_weights_is_refused(registry: Registry, tmp_path: Path) -> None:
    c = make_candidate(tmp_path, seed=0)
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"metadata": {"lensmith.weights_sha256": "f" * 64}}))
    with pytest.raises(RegistryError, match="export report .* other weights"):
        registry.register(c["candidate"], metrics_path=c["metrics"], gate_path=c["gate"], export_path=export)  # type: ignore[arg-type]
    assert registry.version_ids() == []


def test_concurrent_registers_get_distinct_versions(registry: Registry, tmp_path: Path) -> None:
    candidates = [make_candidate(tmp_path, seed=i) for i in range(6)]
    results: list[str] = []
    errors: list[BaseException] = []

    def work(c: dict[str, Path | None]) -> None:
        try:
            results.append(registry.register(c["candidate"], metrics_path=c["metrics"], gate_path=c["gate"]))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [f"v{i:04d}" for i in range(1, 7)]
    assert registry.aliases()["candidate"] in results


# ---- CLI ------------------------------------------------------------------------------------------


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_cli_list_show_promote_rollback(registry: Registry, tmp_path: Path) -> None:
    root = str(tmp_path)
    v1 = register(registry, tmp_path, 0)
    assert cli("models", "promote", v1, "--root", root).exit_code == 0
    v2 = register(registry, tmp_path, 1)
    result = cli("models", "promote", v2, "--root", root)
    assert result.exit_code == 0 and "production -> v0002" in result.output
    listing = cli("models", "list", "--root", root)
    assert listing.exit_code == 0
    lines = {line[2:].split()[0]: line for line in listing.output.splitlines()}
    assert lines["v0002"].startswith("*") and lines["v0001"].startswith(" ")
    shown = cli("models", "show", "production", "--root", root)
    assert shown.exit_code == 0 and json.loads(shown.output)["version"] == "v0002"
    rolled = cli("models", "rollback", "--root", root)
    assert rolled.exit_code == 0 and registry.aliases()["production"] == v1


def test_cli_errors_exit_1_with_a_message(registry: Registry, tmp_path: Path) -> None:
    root = str(tmp_path)
    result = cli("models", "rollback", "--root", root)
    assert result.exit_code == 1 and "no previous" in result.output and "Traceback" not in result.output
    result = cli("models", "promote", "v0009", "--root", root)
    assert result.exit_code == 1 and "unknown model version" in result.output
    rejected = register(registry, tmp_path, 0, passed=False)
    result = cli("models", "promote", rejected, "--root", root)
    assert result.exit_code == 1 and "gate rejected it" in result.output
    assert registry.aliases()["production"] is None
    assert cli("models", "show", "v0009", "--root", root).exit_code == 1
    assert os.path.exists(tmp_path / "models" / "registry" / "aliases.json")
