"""What an operations team plugs in: the Prometheus alert rules (checked and unit-tested with Debian's promtool) and
the Grafana dashboard, whose every query names a metric the service or the drift check really exports; and the live
quality figures those rules watch, fed by corrections through /v1/feedback."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servekit import copy_project, jpeg_bytes, tiny_params

from lensmith.drift.report import prometheus_text
from lensmith.layout import Layout
from lensmith.livequality import LiveQuality, feedback_outcome, quality_figures, queue_quality
from lensmith.serve.app import create_app
from lensmith.serve.models import PathSource

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "ops" / "prometheus" / "lensmith-alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "lensmith-dashboard.json"
TOKEN = "ops-token"
METRIC = re.compile(r"\b(lensmith_[a-z0-9_]+)")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make install-dev` installs Debian's prometheus package (system-deps)"
    return path


# ---- the live figures ---------------------------------------------------------------------------------------


def test_corrections_become_outcomes_and_figures() -> None:
    positive = ("crack", "stain")
    assert feedback_outcome("defect", "crack", positive) == "caught"
    assert feedback_outcome("defect", "ok", positive) == "false_alarm"
    assert feedback_outcome("ok", "stain", positive) == "missed"
    assert feedback_outcome("ok", "ok", positive) == "correct_ok"
    assert feedback_outcome("review", "crack", positive) == "reviewed"
    assert feedback_outcome("crack", "stain", ()) == "not_scored"  # an argmax model: no defect view
    figures = quality_figures(["caught", "caught", "missed", "false_alarm", "correct_ok", "correct_ok", "correct_ok"])
    assert figures["defect_recall"] == pytest.approx(2 / 3) and figures["false_alarm_rate"] == pytest.approx(1 / 4)
    live = LiveQuality(window=2)
    for outcome in ("missed", "caught", "caught", "not_scored"):
        live.add(outcome)
    assert live.figures()["defect_recall"] == 1.0 and live.totals()["missed"] == 1  # the window keeps the last two
    items = [{"reason": "feedback", "feedback_label": "crack", "prediction": {"decision": "ok"}},
             {"reason": "feedback", "feedback_label": "wrong", "prediction": {"decision": "ok"}},
             {"reason": "low_confidence", "feedback_label": None, "prediction": {"decision": "defect"}}]
    block = queue_quality(items, positive, floor=0.8)
    assert block["defect_recall"] == 0.0 and block["below_floor"] is True and block["corrections"] == 1


def exported_metric_names(layout: Layout) -> tuple[set[str], dict[str, float]]:
    """Sample names on /metrics after a prediction and its correction, and the live gauges' values."""

    async def main() -> str:
        app = create_app(tiny_params().serve, layout.root, PathSource(layout.exported), token=TOKEN,
                         quality_floors={"min_positive_recall": 0.8})
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lensmith") as client:
                files = {"file": ("a.jpg", jpeg_bytes(1), "image/jpeg")}
                prediction = (await client.post("/v1/predict", files=files)).json()["predictions"][0]
                truth = "ok" if prediction["decision"] == "defect" else "crack"  # a correction that contradicts it
                answer = await client.post("/v1/feedback", json={"prediction_id": prediction["id"], "label": truth},
                                           headers={"Authorization": f"Bearer {TOKEN}"})
                assert answer.status_code == 201, answer.text
                await client.post("/v1/predict", content=b"")  # a 4xx, so every label set has a sample
                return (await client.get("/metrics")).text

    return names_and_live_values(asyncio.run(main()))


def names_and_live_values(text: str) -> tuple[set[str], dict[str, float]]:
    """Every name a query may use (families without samples yet included: a labelled counter before its first
    increment), and the live gauges' values."""
    families = list(text_string_to_metric_families(text))
    samples = [s for family in families for s in family.samples]
    names = {s.name for s in samples} | {n for family in families for n in exposition_names(family.name)}
    return names, {s.name: s.value for s in samples if s.name.startswith("lensmith_live_")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], dict[str, float]]:
    return exported_metric_names(copy_project(tmp_path_factory.mktemp("ops")))


def drift_metric_names() -> set[str]:
    report = {"drifted_share": 0.5, "decision": {"retrain": True}, "created": "2026-11-30T00:00:00+00:00",
              "live_quality": {"defect_recall": None}}
    return names_and_live_values(prometheus_text(report))[0]


def test_a_correction_moves_the_live_gauges(exported: tuple[set[str], dict[str, float]]) -> None:
    _, live = exported
    # the demo model decides at a threshold: the contradicting correction is a miss or a false alarm
    assert live["lensmith_live_defects"] + live["lensmith_live_good"] == 1
    recall, false_alarms = live["lensmith_live_defect_recall"], live["lensmith_live_false_alarm_rate"]
    assert (recall == 0.0 and math.isnan(false_alarms)) or (false_alarms == 1.0 and math.isnan(recall))


# ---- the rules and the dashboard ----------------------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'lensmith_live_defect_recall{{instance="a"}}'
        values: '0.6x40'
      - series: 'lensmith_quality_floor{{instance="a", name="min_positive_recall"}}'
        values: '0.8x40'
      - series: 'lensmith_live_defects{{instance="a"}}'
        values: '25x40'
      - series: 'lensmith_live_defect_recall{{instance="b"}}'
        values: '0.6x40'
      - series: 'lensmith_quality_floor{{instance="b", name="min_positive_recall"}}'
        values: '0.8x40'
      - series: 'lensmith_live_defects{{instance="b"}}'
        values: '5x40'
      - series: 'lensmith_model_degraded{{instance="a"}}'
        values: '0x5 1x20'
    alert_rule_test:
      - eval_time: 35m
        alertname: LensmithLiveRecallBelowFloor
        exp_alerts:
          - exp_labels: {{severity: page, instance: a}}
            exp_annotations:
              summary: "Corrections say the served model misses more defects than the gate's floor allows"
              description: "live defect recall 0.6 from at least 20 corrected defects (pessimistic: people correct doubtful cases)"
      - eval_time: 20m
        alertname: LensmithModelDegraded
        exp_alerts:
          - exp_labels: {{severity: page}}
            exp_annotations:
              summary: "The newest production model failed to load or warm up; an older one is serving (roll back or fix)"
"""


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: live recall under the floor pages only with enough corrected defects (instance b
    has 5), and a degraded model pages after 10 minutes."""
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    proc = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exposition_names(metric: str) -> set[str]:
    return {metric, f"{metric}_total", f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"}


def test_every_query_names_a_metric_that_is_exported(exported: tuple[set[str], dict[str, float]]) -> None:
    names = exported[0] | drift_metric_names()
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = RULES.read_text()
    used = set(METRIC.findall("\n".join(queries))) | set(METRIC.findall(rules))
    assert len(queries) >= 10 and used
    unknown = sorted(m for m in used if m not in names)
    assert not unknown, f"not exported by the service or reports/drift.prom: {unknown}"
