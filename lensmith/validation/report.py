"""The gate's outcome (`ValidationResult`) and its two reports: JSON for machines, self-contained HTML for people."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lensmith.fsutil import write_json_atomic
from lensmith.htmlreport import HtmlReport
from lensmith.validation.gxrun import CheckResult


@dataclass
class ValidationResult:
    """What a data gate run decided; `str()` is the short human summary the CLI prints."""

    title: str
    checks: list[CheckResult]
    rows: int
    json_path: Path
    html_path: Path
    class_counts: dict[str, int] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed under the summary line (e.g. resolved settings)

    @property
    def success(self) -> bool:
        return all(check.success for check in self.checks if check.blocking)

    @property
    def failed(self) -> list[CheckResult]:
        return [check for check in self.checks if check.blocking and not check.success]

    @property
    def warnings(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.blocking and not check.success]

    def statistics(self) -> dict[str, int]:
        successful = sum(check.success for check in self.checks)
        return {
            "evaluated": len(self.checks),
            "successful": successful,
            "failed": len(self.failed),
            "warnings": len(self.warnings),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "title": self.title,
            "rows": self.rows,
            "statistics": self.statistics(),
            "class_counts": self.class_counts,
            "checks": [check.as_dict() for check in self.checks],
            **self.sections,
        }

    def __str__(self) -> str:
        stats = self.statistics()
        head = (
            f"{self.title} {'passed' if self.success else 'FAILED'}: "
            f"{stats['successful']}/{stats['evaluated']} checks passed on {self.rows} rows"
        )
        lines = [head, *(f"  {note}" for note in self.notes)]
        lines += [f"  failed: {describe_failure(check)}" for check in self.failed]
        lines += [f"  warning: {describe_failure(check)}" for check in self.warnings]
        lines.append(f"  reports: {self.json_path} , {self.html_path}")
        return "\n".join(lines)


def describe_failure(check: CheckResult) -> str:
    """One line: check name, how many rows failed (or the observed value), first examples, hint."""
    if check.exception:
        text = f"{check.name}: error while checking ({check.exception})"
    elif check.expectation_type == "lensmith_precondition":
        text = f"{check.name}: {check.observed_value}"
    elif check.unexpected_count is not None:
        noun = "rows" if check.example_column != "label" else "classes"
        text = f"{check.name}: {check.unexpected_count} {noun} ({_percent(check.unexpected_percent)})"
    else:
        text = f"{check.name}: observed {check.observed_value!r}, expected {expected_text(check)}"
    if check.examples:
        more = ", ..." if len(check.examples) > 3 or (check.unexpected_count or 0) > 3 else ""
        text += f" e.g. {', '.join(check.examples[:3])}{more}"
    if check.hint:
        text += f"; {check.hint}"
    return text


def gate_failure_message(result: ValidationResult) -> str:
    failed = result.failed
    lines = [f"{result.title} gate failed: {len(failed)} check(s) failed (details: {result.json_path})"]
    lines += [f"  - {describe_failure(check)}" for check in failed]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "?%" if value is None else f"{value:.3g}%"


def expected_text(check: CheckResult) -> str:
    """What the expectation asks for, in a few words (for the summary and the HTML table)."""
    kwargs = check.kwargs
    if check.expectation_type.endswith("_to_be_unique"):
        return "unique"
    if check.expectation_type.endswith("_to_not_be_null"):
        return "not null"
    if "value_set" in kwargs:
        return "in {" + ", ".join(map(str, kwargs["value_set"])) + "}"
    if "regex" in kwargs:
        return f"matches {kwargs['regex']}"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    if hi is not None:
        return f"<= {hi:g}"
    if lo is not None:
        return f">= {lo:g}"
    return str({k: v for k, v in kwargs.items() if k != "column"})


def precondition_failure(name: str, problem: str, fix: str) -> CheckResult:
    """A failed check for a problem found before any expectation could run (no manifest, no images...)."""
    return CheckResult(
        name=name,
        expectation_type="lensmith_precondition",
        column=None,
        kwargs={},
        blocking=True,
        success=False,
        observed_value=problem,
        hint=fix,
    )


def write_precondition_report(json_path: Path, html_path: Path, check: CheckResult, rows: int = 0) -> ValidationResult:
    """The data gate's reports for a run that stopped before its checks: one failed check naming problem and fix."""
    result = ValidationResult(title="data validation", checks=[check], rows=rows, json_path=json_path, html_path=html_path)
    write_reports(result)
    return result


def write_reports(result: ValidationResult) -> None:
    """Write the JSON and the HTML report (each atomically)."""
    write_json_atomic(result.json_path, result.as_dict())
    render_html(result).save(result.html_path)


def render_html(result: ValidationResult) -> HtmlReport:
    stats = result.statistics()
    report = HtmlReport(f"Lensmith {result.title}", subtitle=f"{result.rows} rows;")
    summary = f"{stats['successful']} of {stats['evaluated']} checks passed"
    if stats["warnings"]:
        summary += f", {stats['warnings']} warning(s)"
    report.status(result.success, summary)
    report.key_values({"rows": result.rows, **stats})
    if result.class_counts:
        report.heading("Class counts")
        report.table([{"label": label, "images": count} for label, count in result.class_counts.items()])
    report.heading("Checks")
    report.table(_check_rows(result.checks), columns=["check", "column", "severity", "result", "observed", "unexpected", "unexpected %", "expected"])
    problems = result.failed + result.warnings
    if problems:
        report.heading("Failed checks")
        for check in problems:
            report.heading(f"{check.name} ({'critical' if check.blocking else 'warning'})", level=3)
            report.paragraph(describe_failure(check))
            if check.unexpected_values:
                report.paragraph("unexpected values: " + ", ".join(map(str, check.unexpected_values)))
            if check.examples:
                report.table([{check.example_column: example} for example in check.examples])
    for name, section in result.sections.items():
        _render_section(report, name, section)
    return report


def _check_rows(checks: Sequence[CheckResult]) -> list[dict[str, Any]]:
    return [
        {
            "check": check.name,
            "column": check.column,
            "severity": "critical" if check.blocking else "warning",
            "result": check.success,
            "observed": None if check.observed_value is None else str(check.observed_value),
            "unexpected": check.unexpected_count,
            "unexpected %": check.unexpected_percent,
            "expected": expected_text(check),
        }
        for check in checks
    ]


def _render_section(report: HtmlReport, name: str, section: Any) -> None:
    report.heading(name.replace("_", " ").capitalize())
    if not isinstance(section, dict):
        report.paragraph(str(section))
        return
    scalars = {k: v for k, v in section.items() if not isinstance(v, (list, dict))}
    if scalars:
        report.key_values(scalars)
    for key, value in section.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            report.heading(key.replace("_", " "), level=3)
            report.table(value)
        elif isinstance(value, list):
            report.paragraph(f"{key.replace('_', ' ')}: {', '.join(map(str, value)) or '(none)'}")
