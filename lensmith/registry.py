"""Model registry: immutable, numbered versions under models/registry/ plus movable aliases.

models/registry/
  versions/v0001/  model.pt, model.onnx, model.int8.onnx (when exported), export.json, meta.json,
                   metrics.json, gate.json, MODEL_CARD.md, MODEL_CARD.html   (files read-only)
  aliases.json     {"production": ..., "previous": ..., "candidate": ...}   (written atomically, fsynced)
  .lock            fcntl lock held around every change (register, promote, rollback)

A version is built in a hidden temporary folder, fsynced and renamed into place, so a failed or killed
register (or a power loss) never leaves a half version. Nothing in this module writes into an existing version.
A missing aliases.json is a registry with no aliases yet; an unreadable or corrupt one is an error
(never read as "no production": the gate would then compare against nothing and serving would stop).
A gate decision is only good for the production it was compared against (gate.json `champion_version`):
`promote` refuses it once production has moved (rerun the gate).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lensmith.errors import LensmithError
from lensmith.fsutil import fsync_dir, fsync_tree, write_json_atomic
from lensmith.jsondoc import dig, read_json_or_none
from lensmith.layout import EXPORT_JSON, GATE_JSON, INT8_FILE, METRICS_JSON, ONNX_FILE, OPTIMIZED_FILE
from lensmith.modelcard import write_model_card

ALIASES: tuple[str, ...] = ("production", "previous", "candidate")
# weights (torch + ONNX variants) and the drift reference built from them
MODEL_FILES: tuple[str, ...] = (
    "model.pt", ONNX_FILE, OPTIMIZED_FILE, INT8_FILE, "drift_reference.parquet", "drift_reference.json",
)
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
REGISTRY_DIR = "registry"
ALIASES_FIX = (
    "restore it from version control (`git checkout -- models/registry/aliases.json` or `dvc checkout`), or rewrite it as "
    '{"production": "v0003", "previous": null, "candidate": null} with versions listed under versions/'
)


class RegistryError(LensmithError):
    """Unknown version or alias, a refused promotion, nothing to roll back to..."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created: str | None
    metrics: dict[str, float | None]
    aliases: list[str] = field(default_factory=list)
    parent: str | None = None
    gate_decision: str | None = None


def version_id(number: int) -> str:
    return f"v{number:04d}"


def headline_metrics(metrics: Any) -> dict[str, float | None]:
    """The few numbers shown in listings and model cards."""
    return {
        "accuracy": dig(metrics, "test.accuracy"),
        "macro_f1": dig(metrics, "test.macro_f1"),
        "positive_recall": dig(metrics, "test.positive_class.recall"),
        "ece": dig(metrics, "calibration.ece"),
        "robustness_mean_drop": dig(metrics, "robustness.mean_relative_drop"),
    }


def export_weights_sha256(export: Any) -> str | None:
    """The weights an export report was made from (its ONNX metadata), when it says."""
    metadata = export.get("metadata") if isinstance(export, dict) else None
    value = metadata.get("lensmith.weights_sha256") if isinstance(metadata, dict) else None
    return str(value) if value else None


def gate_allows_promotion(gate: Any) -> bool:
    return isinstance(gate, dict) and gate.get("passed") is True and gate.get("decision", "promote") == "promote"


def gate_champion(gate: Any) -> str | None:
    """The production version a gate decision compared against (None: floors only, there was no production)."""
    champion = gate.get("champion_version") if isinstance(gate, dict) else None
    return str(champion) if champion else None


def stale_gate_problem(gate: Any, production: str | None) -> str | None:
    """Why a gate decision no longer holds (production moved since the gate ran), or None while it holds."""
    champion = gate_champion(gate)
    if champion == production:
        return None
    against = f"production {champion}" if champion else "no production model (floors only)"
    return (
        f"its gate decision compared it against {against}, but production is now {production or 'unset'}; "
        "rerun the gate so the candidate is compared against the current production (`lensmith gate`, or "
        "`dvc repro --force gate`: a promotion does not make the gate stage stale)"
    )


def is_alias_value(value: Any) -> bool:
    """None (unset) or a version id."""
    return value is None or (isinstance(value, str) and VERSION_PATTERN.match(value) is not None)


def read_aliases(path: Path) -> dict[str, str | None]:
    """The aliases stored in aliases.json; all unset when the file does not exist yet (a new registry).

    An unreadable file, invalid JSON, or a value that is not a version id raises RegistryError naming the
    file and the fix: a corrupt file must never read as "no production"."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return dict.fromkeys(ALIASES)
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read the registry aliases {path} ({exc}); {ALIASES_FIX}") from None
    try:
        stored = json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"the registry aliases {path} are corrupt (not valid JSON: {exc}); {ALIASES_FIX}") from None
    if not isinstance(stored, dict):
        raise RegistryError(f"the registry aliases {path} are corrupt (not a JSON object); {ALIASES_FIX}")
    bad = {name: stored[name] for name in ALIASES if not is_alias_value(stored.get(name))}
    if bad:
        raise RegistryError(f"the registry aliases {path} are corrupt (not version ids: {bad}); {ALIASES_FIX}")
    return {name: stored.get(name) for name in ALIASES}


def make_read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


class Registry:
    def __init__(self, models_root: Path) -> None:
        self.root = Path(models_root) / REGISTRY_DIR
        self.versions_dir = self.root / "versions"
        self.aliases_path = self.root / "aliases.json"
        self.lock_path = self.root / ".lock"

    # ---- locking and aliases -------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def aliases(self) -> dict[str, str | None]:
        """production/previous/candidate -> version id or None; RegistryError when aliases.json is corrupt."""
        return read_aliases(self.aliases_path)

    def _write_aliases(self, aliases: dict[str, str | None]) -> None:
        write_json_atomic(self.aliases_path, {name: aliases.get(name) for name in ALIASES})

    # ---- reading ---------------------------------------------------------------------------------

    def version_ids(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def resolve(self, alias_or_version: str) -> Path:
        """The folder of a version given its id (v0003) or an alias (production, previous, candidate)."""
        name = alias_or_version.strip()
        if name in ALIASES:
            target = self.aliases()[name]
            if target is None:
                raise RegistryError(f"alias {name!r} is not set (no {name} model in {self.root})")
            name = target
        path = self.versions_dir / name
        if not VERSION_PATTERN.match(name) or not path.is_dir():
            known = ", ".join(self.version_ids()) or "none"
            raise RegistryError(
                f"unknown model version or alias {alias_or_version!r}; versions: {known}; aliases: {', '.join(ALIASES)}"
            )
        return path

    def version_of(self, alias_or_version: str) -> str:
        return self.resolve(alias_or_version).name

    def _aliases_by_version(self) -> dict[str, list[str]]:
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            if version is not None:
                by_version.setdefault(version, []).append(alias)
        return by_version

    def list_versions(self) -> list[VersionInfo]:
        by_version = self._aliases_by_version()
        infos = []
        for version in self.version_ids():
            folder = self.versions_dir / version
            meta = read_json_or_none(folder / "meta.json") or {}
            gate = read_json_or_none(folder / GATE_JSON)
            infos.append(
                VersionInfo(
                    version=version,
                    created=meta.get("created"),
                    metrics=headline_metrics(read_json_or_none(folder / METRICS_JSON)),
                    aliases=by_version.get(version, []),
                    parent=meta.get("parent_version"),
                    gate_decision=gate.get("decision") if isinstance(gate, dict) else None,
                )
            )
        return infos

    def show(self, version: str) -> dict[str, Any]:
        folder = self.resolve(version)
        return {
            "version": folder.name,
            "path": str(folder),
            "aliases": self._aliases_by_version().get(folder.name, []),
            "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
            "meta": read_json_or_none(folder / "meta.json"),
            "metrics": read_json_or_none(folder / METRICS_JSON),
            "gate": read_json_or_none(folder / GATE_JSON),
        }

    # ---- changing --------------------------------------------------------------------------------

    def register(
        self,
        candidate_dir: Path,
        *,
        metrics_path: Path,
        gate_path: Path | None,
        export_path: Path | None = None,
    ) -> str:
        """Copy a candidate (weights, meta, metrics, gate, export report) into a new immutable version.

        Sets the `candidate` alias; returns the version id. The new version's parent is the current
        production version.
        """
        candidate_dir, metrics_path = Path(candidate_dir), Path(metrics_path)
        check_register_inputs(candidate_dir, metrics_path, gate_path, export_path)
        with self._locked():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_staging()
            aliases = self.aliases()
            version = self._next_version_id()
            staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.versions_dir))
            try:
                stage_version(staging, version, candidate_dir, metrics_path, gate_path, export_path, aliases["production"])
                make_read_only(staging)
                fsync_tree(staging)  # the files reach the disk before the folder's new name does
                publish_version(staging, self.versions_dir / version)
                fsync_dir(self.versions_dir)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            aliases["candidate"] = version
            self._write_aliases(aliases)
        return version

    def _remove_stale_staging(self) -> None:
        # Staging folders are only made while holding the lock, so any found by a lock holder
        # belongs to a register that died (killed mid-copy).
        for path in self.versions_dir.glob(".v*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def _next_version_id(self) -> str:
        existing = self.version_ids()
        return version_id(int(existing[-1][1:]) + 1 if existing else 1)

    def promote(self, version: str, *, allow_stale_gate: bool = False) -> None:
        """Make `version` production (the old production becomes previous); refuses versions the gate rejected
        and, unless `allow_stale_gate`, gate decisions made against another production than the current one."""
        with self._locked():
            folder = self.resolve(version)
            gate = read_json_or_none(folder / GATE_JSON)
            if gate is None:
                raise RegistryError(f"refusing to promote {folder.name}: it has no gate.json (it was never gated)")
            if not gate_allows_promotion(gate):
                reasons = "; ".join(str(r) for r in gate.get("reasons", [])[:3]) if isinstance(gate, dict) else ""
                raise RegistryError(
                    f"refusing to promote {folder.name}: the gate rejected it" + (f" ({reasons})" if reasons else "")
                )
            aliases = self.aliases()
            if aliases["production"] == folder.name:
                return
            stale = stale_gate_problem(gate, aliases["production"])
            if stale and not allow_stale_gate:
                raise RegistryError(f"refusing to promote {folder.name}: {stale}")
            aliases["previous"] = aliases["production"]
            aliases["production"] = folder.name
            self._write_aliases(aliases)

    def rollback(self) -> str:
        """Make `previous` production again (production becomes previous, so a rollback can be undone)."""
        with self._locked():
            aliases = self.aliases()
            previous = aliases["previous"]
            if previous is None:
                raise RegistryError("nothing to roll back to: no previous production version")
            self.resolve(previous)
            aliases["previous"], aliases["production"] = aliases["production"], previous
            self._write_aliases(aliases)
        return previous


# ---- building a version ------------------------------------------------------------------------------


def check_register_inputs(candidate_dir: Path, metrics_path: Path, gate_path: Path | None, export_path: Path | None) -> None:
    if not (candidate_dir / "model.pt").is_file():
        raise RegistryError(f"cannot register {candidate_dir}: no model.pt in it")
    if not metrics_path.is_file():
        raise RegistryError(f"cannot register {candidate_dir}: metrics file {metrics_path} does not exist")
    for label, path in (("gate", gate_path), ("export", export_path)):
        if path is not None and not Path(path).is_file():
            raise RegistryError(f"cannot register {candidate_dir}: {label} file {path} does not exist")
    gate = read_json_or_none(Path(gate_path)) if gate_path is not None else None
    meta = read_json_or_none(candidate_dir / "meta.json") or {}
    weights = meta.get("weights_sha256")
    reports = [("gate", gate_path, dig(gate, "candidate.weights_sha256"), "rerun the gate")]
    if export_path is not None:
        exported = export_weights_sha256(read_json_or_none(Path(export_path)))
        reports.append(("export", export_path, exported, "rerun the export"))
    for label, path, reported, fix in reports:
        if reported and weights and reported != weights:
            raise RegistryError(
                f"cannot register {candidate_dir}: {label} report {path} was written for other weights "
                f"({reported[:12]} != {weights[:12]}); {fix}"
            )


def version_meta(
    candidate_meta: dict[str, Any], metrics: Any, version: str, parent: str | None, gate: Any, export: Any = None
) -> dict[str, Any]:
    """The candidate's meta.json (classes, preprocessing, params, data hash, git commit...) plus registry facts."""
    return {
        **candidate_meta,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent_version": parent,
        "metrics": headline_metrics(metrics),
        "gate_decision": gate.get("decision") if isinstance(gate, dict) else None,
        "data_hash": candidate_meta.get("data_hash"),
        "params": candidate_meta.get("params"),
        "git_commit": candidate_meta.get("git_commit"),
        "decision": dig(export, "decision.rule"),  # the rule the served ONNX files carry (chosen on validation)
    }


def stage_version(
    staging: Path,
    version: str,
    candidate_dir: Path,
    metrics_path: Path,
    gate_path: Path | None,
    export_path: Path | None,
    parent: str | None,
) -> None:
    """Fill `staging` with everything a version holds."""
    # weights from the candidate (model.pt) and the export stage's folder (ONNX files beside export.json)
    folders = [candidate_dir] + ([Path(export_path).parent] if export_path is not None else [])
    for name in MODEL_FILES:
        source = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if source is not None:
            shutil.copyfile(source, staging / name)
    shutil.copyfile(metrics_path, staging / METRICS_JSON)
    if gate_path is not None:
        shutil.copyfile(gate_path, staging / GATE_JSON)
    if export_path is None and (candidate_dir / EXPORT_JSON).is_file():
        export_path = candidate_dir / EXPORT_JSON  # the export stage writes its report beside the ONNX files
    if export_path is not None:
        shutil.copyfile(export_path, staging / EXPORT_JSON)
    metrics = read_json_or_none(staging / METRICS_JSON)
    gate = read_json_or_none(staging / GATE_JSON)
    candidate_meta = read_json_or_none(candidate_dir / "meta.json") or {}
    meta = version_meta(candidate_meta, metrics, version, parent, gate, read_json_or_none(staging / EXPORT_JSON))
    write_json_atomic(staging / "meta.json", meta)
    write_model_card(staging, meta=meta, metrics=metrics, gate=gate, export=read_json_or_none(staging / EXPORT_JSON))


def publish_version(staging: Path, target: Path) -> None:
    """Rename the finished staging folder into place; never replaces an existing version."""
    if target.exists():
        raise RegistryError(f"version {target.name} already exists; registered versions are immutable")
    try:
        os.rename(staging, target)
    except OSError as exc:
        raise RegistryError(f"could not publish {target.name}: {exc}") from None
