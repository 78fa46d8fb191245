"""After the gate: register the candidate as a registry version and promote it when the gate passed.

`lensmith run`, the nightly flow and `lensmith models register` all end here, so a model reaches
serving the same way whichever path trained it. Registering is idempotent: a candidate whose weights
are already a version is not registered twice, and a rerun with nothing changed leaves the aliases
alone (a human's rollback is not undone by the next no-op run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lensmith.layout import Layout
from lensmith.jsondoc import read_json_or_none
from lensmith.registry import Registry, RegistryError, gate_allows_promotion


@dataclass(frozen=True)
class PromotionDecision:
    passed: bool  # the gate's verdict on the candidate
    version: str | None  # the registry version holding the candidate (None: not registered)
    promoted: bool  # production moved to `version` in this call
    registered: bool  # `version` was created in this call
    reasons: list[str] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "version": self.version,
            "promoted": self.promoted,
            "registered": self.registered,
            "reasons": list(self.reasons),
            "note": self.note,
        }

    def __str__(self) -> str:
        return self.note


def candidate_weights(layout: Layout) -> str | None:
    meta = read_json_or_none(layout.candidate / "meta.json")
    value = meta.get("weights_sha256") if isinstance(meta, dict) else None
    return str(value) if value else None


def version_with_weights(registry: Registry, weights_sha256: str) -> str | None:
    """The newest registered version made from these weights, if any."""
    for version in reversed(registry.version_ids()):
        meta = read_json_or_none(registry.versions_dir / version / "meta.json")
        if isinstance(meta, dict) and meta.get("weights_sha256") == weights_sha256:
            return version
    return None


def register_candidate(layout: Layout, registry: Registry) -> tuple[str, bool]:
    """(version, newly registered): the candidate with its metrics, gate decision and export."""
    weights = candidate_weights(layout)
    existing = version_with_weights(registry, weights) if weights else None
    if existing is not None:
        return existing, False
    export_json = layout.export_json
    version = registry.register(
        layout.candidate,
        metrics_path=layout.metrics_json,
        gate_path=layout.gate_json,
        export_path=export_json if export_json.is_file() else None,
    )
    return version, True


def promote_if_passed(layout: Layout, *, promote: bool = True) -> PromotionDecision:
    """Register the gated candidate and make it production when the gate passed; keep production otherwise."""
    gate = read_json_or_none(layout.gate_json)
    if not isinstance(gate, dict):
        raise RegistryError(f"no gate decision at {layout.gate_json}: run `lensmith gate` (or the pipeline) first")
    reasons = [str(r) for r in gate.get("reasons", []) or []]
    registry = Registry(layout.models)
    production = registry.aliases()["production"]
    if not gate_allows_promotion(gate):
        return PromotionDecision(
            False, None, False, False, reasons,
            f"gate rejected the candidate: production kept ({production or 'none yet'})",
        )
    version, registered = register_candidate(layout, registry)
    if not registered:
        note = f"candidate already registered as {version} (same weights); production unchanged ({production or 'none'})"
        return PromotionDecision(True, version, False, False, reasons, note)
    if not promote:
        return PromotionDecision(True, version, False, True, reasons, f"registered {version}; not promoted (--no-promote)")
    registry.promote(version)
    return PromotionDecision(True, version, True, True, reasons, f"registered {version} and promoted it to production")
