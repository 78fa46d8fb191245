"""Generated model card of a registered version: MODEL_CARD.md and a self-contained MODEL_CARD.html.

Both are rendered from the same list of `CardSection`s built from meta.json, metrics.json, gate.json
and export.json; anything missing from those files is shown as missing, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensmith.fsutil import write_text_atomic
from lensmith.htmlreport import HtmlReport
from lensmith.jsondoc import dig, flatten

MODEL_CARD_MD = "MODEL_CARD.md"
MODEL_CARD_HTML = "MODEL_CARD.html"


@dataclass
class CardSection:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    key_values: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def intended_use_section(meta: dict[str, Any], metrics: Any) -> CardSection:
    classes = meta.get("classes") or []
    positive = dig(metrics, "test.positive_class.name")
    return CardSection(
        "Intended use",
        paragraphs=[
            "Visual inspection: classify one image of a part, tile or shelf into one of "
            f"{len(classes)} classes ({', '.join(map(str, classes)) or 'unknown'})"
            + (f"; the positive (defect) class is '{positive}'." if positive else "."),
            "Use on images like the training data (same cameras, sites and lighting as the slices below). "
            "Low-confidence predictions belong in human review; the model is not a safety system on its own.",
        ],
    )


def model_section(meta: dict[str, Any]) -> CardSection:
    return CardSection(
        "Model",
        key_values={
            "version": meta.get("version"),
            "created": meta.get("created"),
            "parent version": meta.get("parent_version"),
            "architecture": meta.get("arch"),
            "git commit": meta.get("git_commit"),
            "weights sha256": meta.get("weights_sha256"),
            "preprocessing": meta.get("preprocessing"),
        },
    )


def data_section(meta: dict[str, Any]) -> CardSection:
    hashes = meta.get("data_hash")
    items: dict[str, Any] = dict(hashes) if isinstance(hashes, dict) else {"data hash": hashes}
    for split, count in (meta.get("num_images") or {}).items():
        items[f"{split} images"] = count
    counts = meta.get("class_counts") or {}
    rows = [{"class": name, "training images": n} for name, n in counts.items()]
    return CardSection("Data", key_values=items, rows=rows)


def metrics_section(metrics: Any) -> CardSection:
    test = dig(metrics, "test") or {}
    positive = test.get("positive_class") or {}
    per_class = test.get("per_class") or {}
    rows = [
        {"class": name, **{k: m.get(k) for k in ("precision", "recall", "f1", "support")}}
        for name, m in per_class.items()
        if isinstance(m, dict)
    ]
    return CardSection(
        "Metrics (test split)",
        key_values={
            "accuracy": test.get("accuracy"),
            "macro F1": test.get("macro_f1"),
            **(
                {
                    f"recall of '{positive.get('name')}'": positive.get("recall"),
                    f"precision of '{positive.get('name')}'": positive.get("precision"),
                    "ROC-AUC": positive.get("roc_auc"),
                    "average precision": positive.get("average_precision"),
                }
                if positive
                else {"defect-vs-ok view": "none (no good class among the labels)"}
            ),
            "ECE (calibration)": dig(metrics, "calibration.ece"),
        },
        rows=rows,
    )


def slice_rows(metrics: Any) -> list[dict[str, Any]]:
    rows = []
    for column, block in (dig(metrics, "slices") or {}).items():
        for value, m in ((block or {}).get("values") or {}).items():
            rows.append(
                {
                    "slice": f"{column}={value}",
                    **{k: m.get(k) for k in ("n", "accuracy", "macro_f1", "tpr", "fpr")},
                    "equalized odds gap": block.get("equalized_odds_gap"),
                }
            )
    return rows


def perturbation_rows(metrics: Any) -> list[dict[str, Any]]:
    rows = []
    for name, by_severity in (dig(metrics, "robustness.perturbations") or {}).items():
        for severity, cell in (by_severity or {}).items():
            rows.append({"perturbation": name, "severity": severity, **(cell or {})})
    return rows


def worst_perturbation(metrics: Any) -> dict[str, Any] | None:
    rows = [r for r in perturbation_rows(metrics) if isinstance(r.get("relative_drop"), (int, float))]
    return max(rows, key=lambda r: r["relative_drop"]) if rows else None


def robustness_section(metrics: Any) -> CardSection:
    fgsm = dig(metrics, "robustness.fgsm")
    return CardSection(
        "Robustness",
        key_values={
            "clean accuracy": dig(metrics, "robustness.clean_accuracy"),
            "mean relative drop": dig(metrics, "robustness.mean_relative_drop"),
            "FGSM accuracy": fgsm.get("accuracy") if isinstance(fgsm, dict) else None,
        },
        rows=perturbation_rows(metrics),
    )


def known_limits(metrics: Any, gate: Any, export: Any) -> list[str]:
    """Human sentences: weakest slices, worst perturbation, gate warnings, int8 figures, evaluation warnings."""
    limits = []
    floor = _gate_threshold(gate, "floor.min_slice_accuracy")
    for row in slice_rows(metrics):
        acc = row.get("accuracy")
        if isinstance(acc, (int, float)) and floor is not None and acc < floor:
            n = row.get("n")
            limits.append(f"slice {row['slice']} scores accuracy {acc:.3f}, below the gate floor {floor:.3f} (n={n})")
    rows = [r for r in slice_rows(metrics) if isinstance(r.get("accuracy"), (int, float))]
    if rows:
        weakest = min(rows, key=lambda r: r["accuracy"])
        limits.append(f"weakest slice: {weakest['slice']} (accuracy {weakest['accuracy']:.3f}, n={weakest.get('n')})")
    worst = worst_perturbation(metrics)
    if worst is not None:
        limits.append(
            f"worst perturbation: {worst['perturbation']} at severity {worst['severity']} "
            f"(accuracy {_fmt(worst.get('accuracy'))}, relative drop {worst['relative_drop']:.1%})"
        )
    for warning in (gate or {}).get("warnings", []) if isinstance(gate, dict) else []:
        limits.append(f"gate: {warning}")
    for key, warning in (dig(metrics, "warnings") or {}).items():
        limits.append(f"evaluation ({key}): {warning}")
    if isinstance(export, dict) and export:
        limits.append("serving model per export report: " + _fmt(export.get("serving") or export.get("serving_model")))
    return limits or ["none recorded"]


def _gate_threshold(gate: Any, check_prefix: str) -> float | None:
    for check in (gate or {}).get("checks", []) if isinstance(gate, dict) else []:
        if str(check.get("name", "")).startswith(check_prefix) and isinstance(check.get("threshold"), (int, float)):
            return float(check["threshold"])
    return None


def gate_section(gate: Any) -> CardSection:
    if not isinstance(gate, dict):
        return CardSection("Gate", paragraphs=["No gate report: this version was never gated and cannot be promoted."])
    failed = [c for c in gate.get("checks", []) if not c.get("passed")]
    return CardSection(
        "Gate",
        key_values={
            "decision": gate.get("decision"),
            "champion": gate.get("champion_version"),
            "checks": len(gate.get("checks", [])),
        },
        bullets=[str(r) for r in gate.get("reasons", [])] or ([] if failed else ["all checks passed"]),
    )


def training_params_section(meta: dict[str, Any]) -> CardSection:
    params = meta.get("params")
    train = params.get("train") if isinstance(params, dict) and "train" in params else params
    flat = flatten(train) if isinstance(train, dict) else {"params": train}
    return CardSection("Training parameters", key_values=flat)


def decision_section(metrics: Any, export: Any) -> CardSection:
    """How the served model decides: the rule chosen on validation and the test split's figures at it."""
    rule = dig(export, "decision.rule") or dig(metrics, "decision.rule")
    section = CardSection("Decision rule")
    if not isinstance(rule, dict):
        section.paragraphs.append("not recorded (exported before decision rules): the most probable class decides")
        return section
    point = rule.get("operating_point")
    if rule.get("kind") != "threshold" or not isinstance(point, dict):
        confidence = rule.get("min_confidence")
        section.paragraphs.append("argmax: the most probable class decides" + (
            f"; below confidence {confidence} the image goes to review" if confidence is not None else ""))
        return section
    section.paragraphs.append(
        f"defect when P({' or '.join(rule.get('positive_classes') or [])}) >= {_fmt(point.get('threshold'))}, chosen on "
        f"{point.get('chosen_on', 'val')} for target {point.get('target')}; review band "
        f"[{_fmt(point.get('review_low'))}, {_fmt(point.get('review_high'))})"
    )
    at_test = dig(metrics, "decision.test")
    if isinstance(at_test, dict):
        section.key_values = {f"test {k.replace('_', ' ')}": v for k, v in at_test.items()}
    return section


def card_sections(meta: dict[str, Any], metrics: Any, gate: Any, export: Any) -> list[CardSection]:
    robustness = robustness_section(metrics)
    slices = CardSection("Per-slice results", rows=slice_rows(metrics))
    limits = CardSection("Known limits", bullets=known_limits(metrics, gate, export))
    return [
        intended_use_section(meta, metrics),
        model_section(meta),
        data_section(meta),
        metrics_section(metrics),
        decision_section(metrics, export),
        slices,
        robustness,
        gate_section(gate),
        limits,
        training_params_section(meta),
    ]


def render_markdown(title: str, sections: list[CardSection]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for text in section.paragraphs:
            lines += [text, ""]
        if section.key_values:
            lines += ["| | |", "|---|---|"]
            lines += [f"| {k} | {_md_cell(v)} |" for k, v in section.key_values.items()]
            lines.append("")
        if section.rows:
            columns = list(section.rows[0].keys())
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in columns) + " |" for r in section.rows]
            lines.append("")
        lines += [f"- {b}" for b in section.bullets]
        if section.bullets:
            lines.append("")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def render_html(title: str, sections: list[CardSection]) -> HtmlReport:
    report = HtmlReport(title, "Lensmith model card")
    for section in sections:
        report.heading(section.title)
        for text in section.paragraphs:
            report.paragraph(text)
        if section.key_values:
            report.key_values({k: v if _is_scalar(v) else _fmt(v) for k, v in section.key_values.items()})
        if section.rows:
            report.table(section.rows)
        for bullet in section.bullets:
            report.paragraph(f"• {bullet}")
    return report


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str))


def write_model_card(folder: Path, *, meta: dict[str, Any], metrics: Any, gate: Any, export: Any) -> Path:
    """Write MODEL_CARD.md and MODEL_CARD.html into `folder`; returns the markdown path."""
    title = f"Model card: {meta.get('version') or 'unversioned'} ({meta.get('arch') or 'unknown architecture'})"
    sections = card_sections(meta, metrics, gate, export)
    write_text_atomic(folder / MODEL_CARD_MD, render_markdown(title, sections))
    render_html(title, sections).save(folder / MODEL_CARD_HTML)
    return folder / MODEL_CARD_MD
