"""The whole flywheel, offline, against real components (issue #18):

a `prefect server` on 127.0.0.1 with the nightly and monitoring deployments served by `lensmith schedule`; the
service answering demo site-C images with their context; human corrections through /v1/feedback; review export ->
import into the reviewed-data source; the monitoring deployment flags site C (`where site=C` on the prediction log)
and starts the nightly deployment through Prefect; the nightly retrains on the corrections, the gate decides on the
same test split, the new version is promoted and pushed to the S3 remote (SeaweedFS); the running service
hot-reloads to it without a failed request; drift on a fresh site-C window is lower and site-C accuracy higher.

Small images, few epochs: the figures are printed (and asserted only as before < after); bench/flywheel.py measures
the loop at demo scale.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_server import PrefectServer, api, prefect_server, wait_for_deployment, wait_for_flow_run  # noqa: F401
from lensmith.testing.flywheel import (
    Traffic,
    correct_through_feedback,
    demo_site_images,
    drifted_share,
    lensmith,
    review_round_trip,
    running_schedule,
    running_service,
    served_accuracy,
)
from lensmith.testing.prefectapi import flow_runs_of
from lensmith.testing.project import LENIENT_GATE, make_project, run, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(2700)]

# Floors relaxed (a small model on small images); the gate's comparison with production still decides.
LOOP_OVERRIDES = [
    "demo.per_class=40",
    "train.epochs=3",
    *LENIENT_GATE,
    "gate.max_regression=1.0",
    "gate.max_false_positive_increase=10.0",
    "gate.min_false_negative_reduction=-1.0",
    "export.int8=false",
    "drift.min_window=20",
    "serve.reload_poll_s=1.0",
]
PER_CLASS = 20  # 5 classes: 100 corrected site-C images, and a fresh window of 100 more


@pytest.fixture(scope="module")
def loop_project(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[tuple[Path, dict[str, str], str]]:  # noqa: ANN001
    """The demo project with an S3 remote after its first nightly (v0001 in production), and the service running."""
    root = make_project(tmp_path_factory.mktemp("flywheel") / "proj", LOOP_OVERRIDES)
    env = tool_env(s3_server.env)
    bucket = s3_server.make_bucket("flywheel")
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"], root, env=env)
    run([sys.executable, "-m", "dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url], root, env=env)
    run(["git", "commit", "-qam", "S3 remote"], root)
    first = run(lensmith("nightly"), root, env=env, timeout=1500)
    assert "nightly: promoted" in first.stdout, first.stdout + first.stderr
    with running_service(root, env) as url:
        yield root, env, url


def test_corrections_drift_and_retraining_close_the_loop(loop_project, prefect_server: PrefectServer, tmp_path: Path) -> None:  # noqa: ANN001, F811
    root, env, url = loop_project
    started = time.perf_counter()
    corrected = demo_site_images(root, tmp_path / "site-c-corrections", "C", seed=11, per_class=PER_CLASS)
    fresh = demo_site_images(root, tmp_path / "site-c-fresh", "C", seed=12, per_class=PER_CLASS)
    accuracy_before, version_before = served_accuracy(url, fresh)
    drift_before = drifted_share(root, tmp_path / "site-c-fresh", env)
    assert version_before == "v0001"

    assert correct_through_feedback(url, corrected) == len(corrected)
    imported = review_round_trip(root, tmp_path / "review")
    assert f"imported {len(corrected)} corrected image(s)" in imported, imported

    # The deployments, served as `lensmith schedule` serves them; monitoring runs through Prefect.
    traffic = Traffic(url, fresh[0])
    with running_schedule(root, {**env, **prefect_server.env()}):
        try:
            monitoring = wait_for_deployment(prefect_server, "lensmith-monitoring/drift-monitoring")
            nightly = wait_for_deployment(prefect_server, "lensmith-nightly/nightly-retraining")
            assert monitoring is not None and nightly is not None, (root / "schedule.log").read_text()[-3000:]
            check = api(prefect_server, "post", f"/deployments/{monitoring['id']}/create_flow_run",
                        json={"parameters": {"where": ["site=C"]}})
            assert wait_for_flow_run(prefect_server, check["id"], 600) == "COMPLETED", (root / "schedule.log").read_text()[-4000:]
            triggered = flow_runs_of(prefect_server.api_url, nightly["id"], tag="drift-triggered")
            assert len(triggered) == 1, "the monitoring flow started the nightly deployment through Prefect"
            traffic.start()
            assert wait_for_flow_run(prefect_server, triggered[0]["id"], 1500) == "COMPLETED", (root / "schedule.log").read_text()[-6000:]
            traffic.wait_for_version("v0002", timeout_s=60)
        finally:
            traffic.finish()

    aliases = json.loads((root / "models" / "registry" / "aliases.json").read_text())
    gate = json.loads((root / "reports" / "gate.json").read_text())
    assert aliases["production"] == "v0002" and gate["passed"] is True, gate
    assert traffic.versions == {"v0001", "v0002"} and set(traffic.statuses) == {200}, (
        f"hot reload without a failed request: {sorted(set(traffic.statuses))} over {len(traffic.statuses)} requests")
    synced = run([sys.executable, "-m", "dvc", "status", "--cloud", "--json"], root, env=env)
    assert synced.stdout.strip() in ("", "{}"), f"the nightly pushed the new version and the corrections: {synced.stdout[-2000:]}"
    assert run(["git", "status", "--porcelain", "--", "data/reviewed", "dvc.lock"], root).stdout.strip() == "", \
        "the corrections are recorded with the run"

    accuracy_after, version_after = served_accuracy(url, fresh)
    drift_after = drifted_share(root, tmp_path / "site-c-fresh", env)
    print(f"flywheel loop: {time.perf_counter() - started:.0f} s; site-C accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}; "
          f"drifted share {drift_before:.2f} -> {drift_after:.2f}; {len(traffic.statuses)} requests during the reload")
    assert version_after == "v0002"
    assert accuracy_after > accuracy_before
    assert drift_after < drift_before
