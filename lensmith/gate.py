"""The model gate: absolute floors + champion/challenger against the registry's production model.

Inputs: reports/metrics.json (evaluation of the served candidate), models/candidate/meta.json,
reports/export.json when the export stage ran, and the production model itself: scored again on today's test split
through its own ONNX at its own operating point (lensmith.champion), so the two compare like with like, in the
plant's terms too (missed defects, false alarms). Its stored metrics.json is the fallback when it cannot be scored,
and the report says so. A metric the gate needs but cannot find is a failed check that names it, never a crash. Outputs reports/gate.json and
reports/gate.html; a rejection raises GateFailedError (exit 1) after both are written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lensmith.errors import GateFailedError
from lensmith.fsutil import file_sha256, write_json_atomic
from lensmith.htmlreport import HtmlReport
from lensmith.layout import EXPORT_JSON, GATE_HTML, GATE_JSON, METRICS_JSON, Layout
from lensmith.params import GateParams, Params
from lensmith.jsondoc import dig, read_json_or_none
from lensmith.registry import Registry, RegistryError, export_weights_sha256



@dataclass(frozen=True)
class Check:
    name: str
    value: Any
    threshold: Any
    comparison: str
    passed: bool
    kind: str  # "floor" or "champion"
    detail: str | None = None
    blocking: bool = True


@dataclass
class GateResult:
    passed: bool
    checks: list[Check]
    reasons: list[str]
    champion_version: str | None
    warnings: list[str] = field(default_factory=list)
    json_path: Path | None = None
    html_path: Path | None = None
    champion_compared: str | None = None  # "re-scored on this test split" or "stored metrics"
    champion_rescore_seconds: float | None = None  # what scoring production on today's split cost

    @property
    def decision(self) -> str:
        return "promote" if self.passed else "reject"

    def __str__(self) -> str:
        failed = sum(1 for c in self.checks if not c.passed and c.blocking)
        against = f"production {self.champion_version}" if self.champion_version else "floors only (no production model)"
        against += f", {self.champion_compared}" if self.champion_compared else ""
        head = f"gate {self.decision}: {failed} of {len(self.checks)} checks failed (compared against {against})"
        return "\n".join([head, *(f"  - {r}" for r in self.reasons), *(f"  ! {w}" for w in self.warnings)])


# ---- one check ------------------------------------------------------------------------------------


def compare(value: Any, threshold: Any, comparison: str) -> bool:
    if not isinstance(value, (int, float)) or not isinstance(threshold, (int, float)):
        return False
    if comparison == ">=":
        return value >= threshold
    if comparison == "<=":
        return value <= threshold
    raise ValueError(f"unknown comparison {comparison!r}")


def metric_check(name: str, value: Any, threshold: Any, comparison: str, kind: str, missing: str | None = None) -> Check:
    """A threshold check; a missing value fails with a detail naming what is missing."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return Check(name, None, threshold, comparison, False, kind, f"{missing or name} is missing")
    return Check(name, float(value), threshold, comparison, compare(float(value), threshold, comparison), kind)


# ---- floors ---------------------------------------------------------------------------------------


def floor_checks(metrics: Any, gate: GateParams) -> list[Check]:
    floors = [
        ("floor.min_accuracy", "test.accuracy", gate.min_accuracy, ">="),
        ("floor.min_macro_f1", "test.macro_f1", gate.min_macro_f1, ">="),
        ("floor.min_positive_recall", "test.positive_class.recall", gate.min_positive_recall, ">="),
        ("floor.max_ece", "calibration.ece", gate.max_ece, "<="),
        ("floor.max_robustness_drop", "robustness.mean_relative_drop", gate.max_robustness_drop, "<="),
    ]
    checks = [metric_check(name, dig(metrics, key), limit, op, "floor", f"metrics {key}") for name, key, limit, op in floors]
    if has_no_defect_view(metrics):
        checks = [not_applicable(c, "no defect-vs-ok view (no good class among the labels)") if c.name == "floor.min_positive_recall" else c for c in checks]
    return [*checks, *slice_floor_checks(metrics, gate)]


def has_no_defect_view(metrics: Any) -> bool:
    """True when evaluation found no good class: metrics.json has `test.positive_class: null`."""
    test = dig(metrics, "test")
    return isinstance(test, dict) and "positive_class" in test and test["positive_class"] is None


def not_applicable(check: Check, why: str) -> Check:
    """A floor that does not apply to this data: reported, never blocking."""
    return replace(check, passed=True, blocking=False, detail=f"does not apply: {why}")


def slice_values(metrics: Any) -> dict[str, dict[str, Any]]:
    """{"site=A": {n, accuracy, ...}} for every slice value in metrics.json."""
    flat: dict[str, dict[str, Any]] = {}
    slices = dig(metrics, "slices")
    for column, block in (slices if isinstance(slices, dict) else {}).items():
        values = block.get("values") if isinstance(block, dict) else None
        for value, cell in (values if isinstance(values, dict) else {}).items():
            if isinstance(cell, dict):
                flat[f"{column}={value}"] = cell
    return flat


def slice_is_gated(cell: dict[str, Any], min_n: int) -> bool:
    n = cell.get("n")
    return not isinstance(n, (int, float)) or n >= min_n


def slice_floor_checks(metrics: Any, gate: GateParams) -> list[Check]:
    if not isinstance(dig(metrics, "slices"), dict):
        missing = "metrics slices are missing"
        return [Check("floor.min_slice_accuracy", None, gate.min_slice_accuracy, ">=", False, "floor", missing)]
    checks = []
    for key, cell in slice_values(metrics).items():
        name = f"floor.min_slice_accuracy[{key}]"
        check = metric_check(name, cell.get("accuracy"), gate.min_slice_accuracy, ">=", "floor")
        if not slice_is_gated(cell, gate.min_slice_n):
            check = replace(check, blocking=False, detail=f"only {cell.get('n')} images: reported, not gated")
        checks.append(check)
    return checks


# ---- int8 parity ----------------------------------------------------------------------------------


def serving_precision(export: dict[str, Any]) -> str | None:
    """What export.json says is served ("int8", "fp32"...), read from the first key that is present."""
    for key in ("serving_variant", "serving", "serving_model", "served"):
        value = export.get(key)
        if isinstance(value, dict):
            value = value.get("precision") or value.get("model") or value.get("name") or value.get("path")
        if value:
            return "int8" if "int8" in str(value).lower() else str(value)
    return None


def int8_accuracy_drop(export: dict[str, Any]) -> float | None:
    """fp32 accuracy - int8 accuracy (fraction), computed from accuracies when present, else a stored drop."""
    int8 = export.get("int8") if isinstance(export.get("int8"), dict) else {}
    int8_acc = int8.get("accuracy", dig(export, "accuracy.int8"))
    for ref_acc in (dig(export, "accuracy.fp32"), dig(export, "fp32.accuracy"), dig(export, "onnx.accuracy")):
        if isinstance(int8_acc, (int, float)) and isinstance(ref_acc, (int, float)):
            return float(ref_acc) - float(int8_acc)
    drop = int8.get("accuracy_drop", int8.get("drop"))
    return float(drop) if isinstance(drop, (int, float)) else None


def int8_drop_limit(export: dict[str, Any], params: Params) -> float | None:
    if params.gate.int8_max_drop is not None:
        return params.gate.int8_max_drop
    for key in ("int8.max_drop", "int8.max_accuracy_drop", "limits.int8_max_drop", "int8_max_drop", "params.int8_max_drop"):
        value = dig(export, key)
        if isinstance(value, (int, float)):
            return float(value)
    export_params = getattr(params, "export", None)
    value = getattr(export_params, "int8_max_drop", None)
    return float(value) if isinstance(value, (int, float)) else None


def export_of_candidate(export: Any, candidate_meta: Any) -> tuple[Any, str | None]:
    """(export report, warning): a report made from other weights (a stale one) is set aside."""
    exported, weights = export_weights_sha256(export), dig(candidate_meta, "weights_sha256")
    if export is None or not exported or not weights or exported == weights:
        return export, None
    return None, f"reports/export.json was made from other weights ({exported[:12]}), not the candidate: ignored"


def int8_checks(export: Any, params: Params) -> list[Check]:
    """Only when export.json exists and serves int8: its accuracy drop must be within the export limit."""
    if not isinstance(export, dict) or serving_precision(export) != "int8":
        return []
    limit = int8_drop_limit(export, params)
    drop = int8_accuracy_drop(export)
    check = metric_check("floor.int8_parity", drop, limit, "<=", "floor", "export.json int8 accuracy drop")
    if limit is None:
        return [replace(check, passed=False, detail="no int8 accuracy-drop limit in params or export.json")]
    rejected_by_export = any(dig(export, f"int8.{key}") is False for key in ("kept", "accepted", "passed"))
    if rejected_by_export:
        detail = "export.json serves int8 although its int8 gate rejected it"
        return [replace(check, passed=False, detail=detail)]
    return [check]


# ---- champion / challenger ------------------------------------------------------------------------


def improvement_check(metrics: Any, champion: Any, gate: GateParams) -> Check:
    name = f"champion.improvement[{gate.metric}]"
    champ, ours = dig(champion, gate.metric), dig(metrics, gate.metric)
    if not isinstance(champ, (int, float)):
        return Check(name, ours, None, ">=", False, "champion", f"production metrics lack {gate.metric}")
    check = metric_check(name, ours, float(champ) + gate.min_improvement, ">=", "champion", f"metrics {gate.metric}")
    return check if check.value is None else replace(check, detail=f"production {champ:.4f} + {gate.min_improvement}")


def regression_check(name: str, champion_value: Any, value: Any, measure: str, missing: str, gate: GateParams) -> Check:
    """The candidate's `measure` may fall at most gate.max_regression below production's (champion - candidate);
    either value missing fails with `missing` as the detail."""
    if not isinstance(champion_value, (int, float)) or not isinstance(value, (int, float)):
        return Check(name, None, gate.max_regression, "<=", False, "champion", missing)
    check = metric_check(name, float(champion_value) - float(value), gate.max_regression, "<=", "champion")
    return replace(check, detail=f"{measure} {champion_value:.4f} -> {value:.4f}")


def recall_regression_checks(metrics: Any, champion: Any, gate: GateParams) -> list[Check]:
    """Recall drop per class of the production model."""
    checks = []
    champ_classes, our_classes = dig(champion, "test.per_class"), dig(metrics, "test.per_class")
    champ_classes = champ_classes if isinstance(champ_classes, dict) else {}
    our_classes = our_classes if isinstance(our_classes, dict) else {}
    for label, cell in champ_classes.items():
        champ_recall = cell.get("recall") if isinstance(cell, dict) else None
        ours = our_classes.get(label)
        recall = ours.get("recall") if isinstance(ours, dict) else None
        name, missing = f"champion.recall_regression[{label}]", f"recall of class {label!r} is missing"
        checks.append(regression_check(name, champ_recall, recall, "recall", missing, gate))
    return checks


def slice_regression_checks(metrics: Any, champion: Any, gate: GateParams) -> list[Check]:
    """Accuracy drop per slice value present (and large enough) in both models' metrics."""
    ours, theirs = slice_values(metrics), slice_values(champion)
    checks = []
    for key in sorted(set(ours) & set(theirs)):
        if not (slice_is_gated(ours[key], gate.min_slice_n) and slice_is_gated(theirs[key], gate.min_slice_n)):
            continue
        acc, champ_acc = ours[key].get("accuracy"), theirs[key].get("accuracy")
        name, missing = f"champion.slice_regression[{key}]", f"accuracy of slice {key} is missing"
        checks.append(regression_check(name, champ_acc, acc, "accuracy", missing, gate))
    return checks


def split_hash_from_meta(meta: Any) -> str | None:
    hashes = dig(meta, "data_hash")
    if isinstance(hashes, dict):
        for key, value in hashes.items():
            if str(key).replace("\\", "/").endswith("splits/test.parquet"):
                return str(value)
    return None


def candidate_test_split_hash(layout: Layout, candidate_meta: Any) -> str | None:
    """Hash of the test split the candidate was just evaluated on (the file itself when present)."""
    test_file = layout.split_file("test")
    return file_sha256(test_file) if test_file.is_file() else split_hash_from_meta(candidate_meta)


def same_split_check(candidate_hash: str | None, champion_hash: str | None, gate: GateParams) -> Check:
    same = candidate_hash is not None and candidate_hash == champion_hash
    detail = None
    if not same:
        detail = (
            "test split hash unknown for one of the models"
            if candidate_hash is None or champion_hash is None
            else "production was scored on a different test split; the comparison is not like for like"
        )
    return Check(
        "champion.same_test_split",
        candidate_hash,
        champion_hash,
        "==",
        same,
        "champion",
        detail,
        blocking=gate.require_same_test_split,
    )


def plant_checks(metrics: Any, champion: Any, gate: GateParams) -> list[Check]:
    """Missed defects and false alarms, each model at its own operating point (rates: the same test split when
    production was re-scored, comparable ones when only its stored metrics could be read)."""
    ours, theirs = dig(metrics, "decision.test"), dig(champion, "decision.test")
    names = ("champion.missed_defect_rate", "champion.false_alarm_rate")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        why = "one of the models decides by argmax (no operating point: no defect-vs-ok view or target argmax)"
        return [not_applicable(Check(n, None, None, "<=", False, "champion"), why) for n in names]

    def miss_rate(figures: dict[str, Any]) -> float | None:
        defects = figures.get("defects") or 0
        return figures["missed_defects"] / defects if defects else None

    ours_miss, theirs_miss = miss_rate(ours), miss_rate(theirs)
    checks = [
        metric_check(
            names[0], ours_miss, None if theirs_miss is None else theirs_miss * (1.0 - gate.min_false_negative_reduction),
            "<=", "champion", "no defects in the test split",
        ),
        metric_check(
            names[1], ours.get("false_alarm_rate"),
            None if theirs.get("false_alarm_rate") is None else theirs["false_alarm_rate"] * (1.0 + gate.max_false_positive_increase),
            "<=", "champion", "no good images in the test split",
        ),
    ]
    details = (f"missed {ours['missed_defects']} of {ours['defects']} vs production {theirs['missed_defects']} of {theirs['defects']}",
               f"false alarms {ours['false_alarms']} vs production {theirs['false_alarms']} (of {ours['n'] - ours['defects']} / {theirs['n'] - theirs['defects']} good)")
    return [replace(c, detail=d) if c.value is not None and c.threshold is not None else c for c, d in zip(checks, details)]


def speed_checks(metrics: Any, gate: GateParams) -> list[Check]:
    """Throughput and latency floors of the served model (as evaluate measured it), when params set them."""
    checks = []
    if gate.min_images_per_s is not None:
        checks.append(metric_check("floor.min_images_per_s", dig(metrics, "throughput.images_per_s"), gate.min_images_per_s,
                                   ">=", "floor", "metrics throughput.images_per_s"))
    if gate.max_latency_ms is not None:
        checks.append(metric_check("floor.max_latency_ms", dig(metrics, "throughput.latency_ms_p95"), gate.max_latency_ms,
                                   "<=", "floor", "metrics throughput.latency_ms_p95"))
    return checks


def champion_checks(metrics: Any, champion: Any, split_check: Check, gate: GateParams) -> list[Check]:
    return [
        improvement_check(metrics, champion, gate),
        *recall_regression_checks(metrics, champion, gate),
        *slice_regression_checks(metrics, champion, gate),
        *plant_checks(metrics, champion, gate),
        split_check,
    ]


# ---- the whole gate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    version: str
    metrics: Any  # as stored with the version (its own, possibly older, test split)
    meta: Any
    folder: Path | None = None
    rescored: Any = None  # production's metrics on today's test split (lensmith.champion), when it could be scored
    why_not_rescored: str | None = None
    rescore_seconds: float | None = None

    @property
    def compared_metrics(self) -> Any:
        return self.rescored if self.rescored is not None else self.metrics


def production_champion(layout: Layout) -> Champion | None:
    registry = Registry(layout.models)
    if registry.aliases()["production"] is None:
        return None
    try:
        folder = registry.resolve("production")
    except RegistryError:
        return Champion(str(registry.aliases()["production"]), None, None)
    return Champion(folder.name, read_json_or_none(folder / METRICS_JSON), read_json_or_none(folder / "meta.json"), folder)


def rescored_champion(champion: Champion | None, params: Params, layout: Layout) -> Champion | None:
    """The champion with its metrics on today's test split, or with the reason they could not be computed."""
    if champion is None:
        return None
    if champion.folder is None:
        return replace(champion, why_not_rescored="its registry folder cannot be read")
    from lensmith.champion import rescore_production

    result = rescore_production(params, layout, champion.folder)
    return replace(champion, rescored=result.metrics, why_not_rescored=result.why_not, rescore_seconds=round(result.seconds, 2))


def failure_reason(check: Check) -> str:
    if check.value is None or check.threshold is None:
        return f"{check.name}: {check.detail or 'missing value'}"
    text = f"{check.name}: {_fmt(check.value)} is not {check.comparison} {_fmt(check.threshold)}"
    return f"{text} ({check.detail})" if check.detail else text


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def evaluate_gate(
    metrics: Any,
    export: Any,
    champion: Champion | None,
    candidate_split_hash: str | None,
    params: Params,
) -> GateResult:
    """Pure decision from already-loaded inputs (no files written)."""
    gate = params.gate
    checks = [*floor_checks(metrics, gate), *speed_checks(metrics, gate), *int8_checks(export, params)]
    warnings = []
    if metrics is None:
        warnings.append("reports/metrics.json is missing or unreadable: every metric check fails")
    if champion is not None:
        if champion.rescored is not None:
            split_check = Check("champion.same_test_split", candidate_split_hash, candidate_split_hash, "==", True,
                                "champion", f"production {champion.version} re-scored on this test split")
        else:
            if champion.why_not_rescored:
                warnings.append(f"production {champion.version} could not be scored on this test split "
                                f"({champion.why_not_rescored}): compared with the metrics stored with it")
            if champion.metrics is None:
                missing = f"production {champion.version} has no readable metrics.json"
                checks.append(Check("champion.metrics", None, None, "present", False, "champion", missing))
            split_check = same_split_check(candidate_split_hash, split_hash_from_meta(champion.meta), gate)
            if not split_check.passed:
                warnings.append(f"{split_check.detail} (production {champion.version})")
        checks += champion_checks(metrics, champion.compared_metrics, split_check, gate)
    reasons = [failure_reason(c) for c in checks if not c.passed and c.blocking]
    compared = None if champion is None else ("re-scored on this test split" if champion.rescored is not None else "stored metrics")
    return GateResult(not reasons, checks, reasons, champion.version if champion else None, warnings, champion_compared=compared)


def gate_json(
    result: GateResult, metrics_path: Path, candidate_meta: Any, candidate_split_hash: str | None, params: Params
) -> dict[str, Any]:
    return {
        "passed": result.passed,
        "decision": result.decision,
        "reasons": result.reasons,
        "champion_version": result.champion_version,
        "champion_compared": result.champion_compared,
        "champion_rescore_seconds": result.champion_rescore_seconds,
        "warnings": result.warnings,
        "metric": params.gate.metric,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "candidate": {
            "metrics_path": str(metrics_path),
            "weights_sha256": dig(candidate_meta, "weights_sha256"),
            "test_split_hash": candidate_split_hash,
        },
        "params": params.gate.model_dump(mode="json"),
        "checks": [asdict(c) for c in result.checks],
    }


def gate_html(result: GateResult, params: Params) -> HtmlReport:
    report = HtmlReport("Model gate", "Champion/challenger + absolute floors")
    against = f"production {result.champion_version}" if result.champion_version else "floors only (no production model yet)"
    against += f" ({result.champion_compared})" if result.champion_compared else ""
    report.status(result.passed, f"decision: {result.decision}; compared against {against}")
    if result.reasons:
        report.heading("Why it was rejected")
        for reason in result.reasons:
            report.paragraph(reason)
    if result.warnings:
        report.heading("Warnings")
        for warning in result.warnings:
            report.paragraph(warning)
    report.heading("Checks")
    report.table(
        [{**asdict(c), "blocking": "yes" if c.blocking else "no (advisory)"} for c in result.checks],
        ["name", "kind", "value", "comparison", "threshold", "passed", "blocking", "detail"],
    )
    report.heading("Gate parameters")
    report.key_values(params.gate.model_dump(mode="json"))
    return report


def run_gate(params: Params, layout: Layout, *, raise_on_reject: bool = True) -> GateResult:
    """Decide promote/reject for models/candidate, write reports/gate.{json,html}; raise GateFailedError on reject."""
    metrics_path = layout.reports / METRICS_JSON
    metrics = read_json_or_none(metrics_path)
    candidate_meta = read_json_or_none(layout.candidate / "meta.json")
    export, stale_export = export_of_candidate(read_json_or_none(layout.reports / EXPORT_JSON), candidate_meta)
    champion = rescored_champion(production_champion(layout), params, layout)
    split_hash = candidate_test_split_hash(layout, candidate_meta)
    result = evaluate_gate(metrics, export, champion, split_hash, params)
    result.warnings += [stale_export] if stale_export else []
    result.champion_rescore_seconds = champion.rescore_seconds if champion is not None else None
    result.json_path = layout.reports / GATE_JSON
    result.html_path = layout.reports / GATE_HTML
    write_json_atomic(result.json_path, gate_json(result, metrics_path, candidate_meta, split_hash, params))
    gate_html(result, params).save(result.html_path)
    if raise_on_reject and not result.passed:
        more = len(result.reasons) - 5
        shown = "; ".join(result.reasons[:5]) + (f"; ... ({more} more)" if more > 0 else "")
        raise GateFailedError(f"gate rejected the candidate: {shown} (see {result.json_path})")
    return result
