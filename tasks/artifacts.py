"""Publish what a stage produced as Prefect artifacts, read from the stage's output files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lensmith.layout import SPLIT_NAMES, Layout


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def publish_validation(layout: Layout) -> None:
    report = _read_json(layout.validation_json)
    if report is None:
        return
    failed = [c for c in report.get("checks", []) if not c.get("success", True)]
    lines = [
        f"## Data validation: {'PASSED' if report.get('success') else 'FAILED'}",
        f"Report: `{layout.validation_html}`",
        "",
    ]
    lines += [f"- **{c.get('name', c.get('expectation', '?'))}** {c.get('column') or ''}: {c.get('detail', '')}" for c in failed]
    create_markdown_artifact(key="data-validation", markdown="\n".join(lines), description="Great Expectations data gate")


def publish_split(layout: Layout) -> None:
    rows = []
    for name in SPLIT_NAMES:
        path = layout.split_file(name)
        if path.exists():
            counts = pd.read_parquet(path, columns=["label"])["label"].value_counts()
            rows += [{"split": name, "label": str(label), "images": int(n)} for label, n in sorted(counts.items())]
    if rows:
        create_table_artifact(key="split-counts", table=rows, description="Images per split and class")


def publish_training(layout: Layout) -> None:
    summary = _read_json(layout.reports / "train" / "metrics.json")
    if summary:
        rows = [{"metric": k, "value": _fmt(v)} for k, v in _flatten(summary).items()]
        create_table_artifact(key="training-summary", table=rows, description="Last epoch (dvclive)")


def publish_evaluation(layout: Layout) -> None:
    metrics = _read_json(layout.metrics_json)
    if not metrics:
        return
    test = metrics.get("test", {})
    headline = {k: v for k, v in test.items() if not isinstance(v, dict)}
    headline["calibration.ece"] = metrics.get("calibration", {}).get("ece")
    headline["robustness.mean_relative_drop"] = metrics.get("robustness", {}).get("mean_relative_drop")
    create_table_artifact(
        key="test-metrics",
        table=[{"metric": k, "value": _fmt(v)} for k, v in headline.items()],
        description=f"Test-split metrics; report: {layout.reports / 'evaluation.html'}",
    )
    per_class = [{"class": label, **{k: _fmt(v) for k, v in m.items()}} for label, m in test.get("per_class", {}).items()]
    if per_class:
        create_table_artifact(key="per-class-metrics", table=per_class, description="Per-class metrics")
    slice_rows = []
    for column, block in metrics.get("slices", {}).items():
        for value, m in (block.get("values") or {}).items():
            slice_rows.append({"slice": f"{column}={value}", **{k: _fmt(v) for k, v in m.items()}})
    if slice_rows:
        create_table_artifact(key="per-slice-metrics", table=slice_rows, description="Per-slice metrics")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def publish_gate(layout: Layout) -> None:
    gate = _read_json(layout.gate_json)
    if gate is None:
        return
    lines = [f"## Gate: {'PASSED' if gate.get('passed') else 'REJECTED'} (decision: {gate.get('decision')})",
             f"Champion: {gate.get('champion_version') or 'none (first model: floors only)'}", ""]
    lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    create_markdown_artifact(key="gate-decision", markdown="\n".join(lines), description="Champion/challenger gate")
    rows = [{"check": c.get("name"), "value": _fmt(c.get("value")), "threshold": _fmt(c.get("threshold")),
             "passed": str(c.get("passed"))} for c in gate.get("checks", [])]
    if rows:
        create_table_artifact(key="gate-checks", table=rows, description="Every gate check")


PUBLISHERS = {
    "validate": publish_validation,
    "split": publish_split,
    "train": publish_training,
    "evaluate": publish_evaluation,
    "gate": publish_gate,
}


def publish_stage_artifacts(stage: str, layout: Layout) -> None:
    publisher = PUBLISHERS.get(stage)
    if publisher is not None:
        publisher(layout)
