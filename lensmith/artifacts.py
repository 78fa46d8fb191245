"""What the flow shows about a stage, read from the stage's output files (no Prefect here: tasks/artifacts.py
posts these to the Prefect API). A stage names its function in the stage table (`Stage.publishes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lensmith.jsondoc import flatten, read_json_or_none
from lensmith.layout import SPLIT_NAMES, Layout


@dataclass(frozen=True)
class Artifact:
    """A markdown note or a table, under a stable key (the Prefect UI keeps one history per key)."""

    key: str
    description: str
    markdown: str | None = None
    table: list[dict[str, Any]] | None = None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(key: str, rows: list[dict[str, Any]], description: str) -> list[Artifact]:
    return [Artifact(key, description, table=rows)] if rows else []


def validation_artifacts(layout: Layout) -> list[Artifact]:
    report = read_json_or_none(layout.validation_json)
    if report is None:
        return []
    failed = [c for c in report.get("checks", []) if not c.get("success", True)]
    lines = [f"## Data validation: {'PASSED' if report.get('success') else 'FAILED'}", f"Report: `{layout.validation_html}`", ""]
    lines += [f"- **{c.get('name', c.get('expectation', '?'))}** {c.get('column') or ''}: {c.get('detail', '')}" for c in failed]
    return [Artifact("data-validation", "Great Expectations data gate", markdown="\n".join(lines))]


def split_artifacts(layout: Layout) -> list[Artifact]:
    import pandas as pd

    rows = []
    for name in SPLIT_NAMES:
        path = layout.split_file(name)
        if path.exists():
            counts = pd.read_parquet(path, columns=["label"])["label"].value_counts()
            rows += [{"split": name, "label": str(label), "images": int(n)} for label, n in sorted(counts.items())]
    return _table("split-counts", rows, "Images per split and class")


def training_artifacts(layout: Layout) -> list[Artifact]:
    summary = read_json_or_none(layout.reports / "train" / "metrics.json")
    rows = [{"metric": k, "value": _fmt(v)} for k, v in flatten(summary).items()] if summary else []
    return _table("training-summary", rows, "Last epoch (dvclive)")


def evaluation_artifacts(layout: Layout) -> list[Artifact]:
    metrics = read_json_or_none(layout.metrics_json)
    if not metrics:
        return []
    test = metrics.get("test", {})
    headline = {k: v for k, v in test.items() if not isinstance(v, dict)}
    headline["calibration.ece"] = metrics.get("calibration", {}).get("ece")
    headline["robustness.mean_relative_drop"] = metrics.get("robustness", {}).get("mean_relative_drop")
    per_class = [{"class": label, **{k: _fmt(v) for k, v in m.items()}} for label, m in test.get("per_class", {}).items()]
    slices = [
        {"slice": f"{column}={value}", **{k: _fmt(v) for k, v in m.items()}}
        for column, block in metrics.get("slices", {}).items()
        for value, m in (block.get("values") or {}).items()
    ]
    return (
        _table("test-metrics", [{"metric": k, "value": _fmt(v)} for k, v in headline.items()],
               f"Test-split metrics; report: {layout.reports / 'evaluation.html'}")
        + _table("per-class-metrics", per_class, "Per-class metrics")
        + _table("per-slice-metrics", slices, "Per-slice metrics")
    )


def gate_artifacts(layout: Layout) -> list[Artifact]:
    gate = read_json_or_none(layout.gate_json)
    if gate is None:
        return []
    lines = [f"## Gate: {'PASSED' if gate.get('passed') else 'REJECTED'} (decision: {gate.get('decision')})",
             f"Champion: {gate.get('champion_version') or 'none (first model: floors only)'}", ""]
    lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    rows = [{"check": c.get("name"), "value": _fmt(c.get("value")), "threshold": _fmt(c.get("threshold")),
             "passed": str(c.get("passed"))} for c in gate.get("checks", [])]
    return [Artifact("gate-decision", "Champion/challenger gate", markdown="\n".join(lines))] + _table(
        "gate-checks", rows, "Every gate check"
    )
