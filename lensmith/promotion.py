"""After the gate: register the candidate as a registry version and promote it when the gate passed.

`lensmith run`, the nightly flow and `lensmith models register` all end here, so a model reaches
serving the same way whichever path trained it. Registering is idempotent: a candidate whose weights
are already a version (gated against the same production) is not registered twice, and a rerun with
nothing changed leaves the aliases alone (a human's rollback is not undone by the next no-op run).
A gate decision made against another production than the current one (reports/gate.json
`champion_version`; production was promoted or rolled back since) is refused before anything is
registered: rerun the gate. Re-gated weights register as a new version carrying the fresh decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lensmith.layout import GATE_JSON, Layout
from lensmith.jsondoc import read_json_or_none
from lensmith.registry import Registry, RegistryError, gate_allows_promotion, gate_champion, stale_gate_problem


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


def version_with_weights(registry: Registry, weights_sha256: str, champion: str | None) -> str | None:
    """The newest registered version made from these weights and gated against `champion`, if any."""
    for version in reversed(registry.version_ids()):
        folder = registry.versions_dir / version
        meta = read_json_or_none(folder / "meta.json")
        if isinstance(meta, dict) and meta.get("weights_sha256") == weights_sha256:
            if gate_champion(read_json_or_none(folder / GATE_JSON)) == champion:
                return version
    return None


def registered_candidate(layout: Layout, registry: Registry) -> str | None:
    """The version already holding the candidate's weights with the same gate decision's champion, if any."""
    weights = candidate_weights(layout)
    champion = gate_champion(read_json_or_none(layout.gate_json))
    return version_with_weights(registry, weights, champion) if weights else None


def register_candidate(layout: Layout, registry: Registry) -> tuple[str, bool]:
    """(version, newly registered): the candidate with its metrics, gate decision and export."""
    existing = registered_candidate(layout, registry)
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
    """Register the gated candidate and make it production when the gate passed; keep production otherwise.

    Refuses (RegistryError, nothing registered) a passed gate decision made against another production than
    the current one, unless the candidate is already registered (then nothing changes)."""
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
    stale = stale_gate_problem(gate, production)
    if stale and promote and registered_candidate(layout, registry) is None:
        raise RegistryError(f"refusing to register and promote the candidate: {stale} (gate decision: {layout.gate_json})")
    version, registered = register_candidate(layout, registry)
    if not registered:
        note = f"candidate already registered as {version} (same weights); production unchanged ({production or 'none'})"
        return PromotionDecision(True, version, False, False, reasons, note)
    if not promote:
        return PromotionDecision(True, version, False, True, reasons, f"registered {version}; not promoted (--no-promote)")
    registry.promote(version)
    return PromotionDecision(True, version, True, True, reasons, f"registered {version} and promoted it to production")
