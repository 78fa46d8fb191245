"""One turn of the flywheel at the demo's size, timed step by step, with site-C accuracy and drift before and after.

A fresh demo project (the shipped params.yaml, plus --set overrides), a SeaweedFS S3 remote and a `prefect server`
on 127.0.0.1; the first nightly puts v0001 in production; then the loop (lensmith/testing/flywheel.py, the same
steps tests/test_flywheel_loop.py takes on small images): --corrections site-C images served with their context
and corrected through /v1/feedback, review export -> import, the monitoring deployment (where site=C) starts the
nightly deployment, which retrains on the corrections, gates, promotes and pushes; the service hot-reloads under
traffic. A fresh site-C window (another seed) is scored through the service and checked for drift before and after.

    python bench/flywheel.py [--corrections 100] [--window 200] [--set train.epochs=8 ...] [--keep DIR]

Writes reports/bench/flywheel.json in this checkout. Run it on a quiet machine (~15 min at the demo's size).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import cpu_flags  # noqa: E402
from lensmith.testing.flywheel import (  # noqa: E402
    Traffic,
    correct_through_feedback,
    demo_site_images,
    drift_figures,
    drifted_share,
    lensmith,
    review_round_trip,
    running_schedule,
    running_service,
    served_accuracy,
)
from lensmith.testing.prefectapi import api, flow_runs_of, running_prefect_server, wait_for_deployment, wait_for_flow_run  # noqa: E402
from lensmith.testing.project import make_project, run, tool_env  # noqa: E402
from lensmith.testing.s3server import start_s3_server, stop_s3_server  # noqa: E402

CLASSES = 5


class Clock:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self._last, 1)
        self._last = now
        print(f"  {name}: {self.steps[name]:.1f} s", flush=True)


def one_turn(work: Path, args: argparse.Namespace) -> dict[str, object]:
    s3 = start_s3_server()
    try:
        with running_prefect_server(work / "prefect-home") as prefect:
            root = make_project(work / "proj", list(args.set), tiny=False)
            env = tool_env(s3.env)
            bucket = s3.make_bucket("flywheel")
            run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"], root, env=env)
            run([sys.executable, "-m", "dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint_url], root, env=env)
            run(["git", "commit", "-qam", "S3 remote"], root)
            clock = Clock()
            first = run(lensmith("nightly"), root, env=env, timeout=3600)
            if "nightly: promoted" not in first.stdout:
                raise SystemExit(f"the first nightly did not promote:\n{first.stdout[-3000:]}\n{first.stderr[-3000:]}")
            clock.lap("first nightly (demo data, train, gate, promote v0001, push)")
            corrected = demo_site_images(root, work / "corrections", "C", seed=11, per_class=args.corrections // CLASSES)
            fresh = demo_site_images(root, work / "fresh", "C", seed=12, per_class=args.window // CLASSES)
            clock.lap("site-C images written")
            with running_service(root, env) as url:
                before, _ = served_accuracy(url, fresh)
                drift_before = drifted_share(root, work / "fresh", env)
                clock.lap("before: fresh site-C window scored and checked for drift")
                loop_start = time.perf_counter()
                correct_through_feedback(url, corrected)
                clock.lap("corrections served with context and sent as feedback")
                imported = review_round_trip(root, work / "review")
                clock.lap("review export -> import")
                traffic = Traffic(url, fresh[0])
                with running_schedule(root, {**env, **prefect.env()}):
                    monitoring = wait_for_deployment(prefect.api_url, "lensmith-monitoring/drift-monitoring")
                    nightly = wait_for_deployment(prefect.api_url, "lensmith-nightly/nightly-retraining")
                    if monitoring is None or nightly is None:
                        raise SystemExit("the deployments were not registered:\n" + (root / "schedule.log").read_text()[-3000:])
                    clock.lap("deployments served")
                    check = api(prefect.api_url, "post", f"/deployments/{monitoring['id']}/create_flow_run",
                                json={"parameters": {"where": ["site=C"]}})
                    monitoring_state = wait_for_flow_run(prefect.api_url, check["id"], 900)
                    clock.lap("monitoring flow (drift on the prediction log, where site=C)")
                    triggered = flow_runs_of(prefect.api_url, nightly["id"], tag="drift-triggered")
                    if monitoring_state != "COMPLETED" or not triggered:
                        raise SystemExit(f"monitoring {monitoring_state}, triggered {len(triggered)}:\n"
                                         + (root / "schedule.log").read_text()[-4000:])
                    traffic.start()
                    try:
                        nightly_state = wait_for_flow_run(prefect.api_url, triggered[0]["id"], 3600)
                        clock.lap("drift-triggered nightly (retrain, gate, promote, push)")
                        reloaded = traffic.wait_for_version("v0002", timeout_s=120)
                        clock.lap("service hot-reloaded")
                    finally:
                        traffic.finish()
                loop_s = time.perf_counter() - loop_start
                after, version = served_accuracy(url, fresh)
                drift_after = drifted_share(root, work / "fresh", env)
                clock.lap("after: fresh site-C window scored and checked for drift")
                # the retrained model itself, whether the gate promoted it or not
                retrained_drift, retrained_accuracy = drift_figures(root, work / "fresh", env, model="candidate")
            gate = json.loads((root / "reports" / "gate.json").read_text())
            return {
                "overrides": list(args.set),
                "corrections": len(corrected),
                "imported": imported.strip().splitlines()[0],
                "window": len(fresh),
                "loop_wall_s": round(loop_s, 1),
                "steps_s": clock.steps,
                "nightly_state": nightly_state,
                "gate_passed": gate.get("passed"),
                "gate_reasons": gate.get("reasons"),
                "served_after": version,
                "reloaded": reloaded,
                "requests_during_reload": len(traffic.statuses),
                "statuses_during_reload": sorted(set(traffic.statuses)),
                "site_c_accuracy_before": round(before, 4),
                "site_c_accuracy_after": round(after, 4),
                "site_c_accuracy_gain_points": round(100 * (after - before), 1),
                "drifted_share_before": drift_before,
                "drifted_share_after": drift_after,
                "retrained_site_c_accuracy": retrained_accuracy,
                "retrained_drifted_share": retrained_drift,
            }
    finally:
        stop_s3_server(s3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corrections", type=int, default=100, help="site-C images corrected by a person (multiple of 5)")
    parser.add_argument("--window", type=int, default=200, help="fresh site-C images scored before and after (multiple of 5)")
    parser.add_argument("--set", action="append", default=[], help="params override for the project, e.g. train.epochs=4")
    parser.add_argument("--keep", type=Path, help="keep the project here instead of a temp dir")
    args = parser.parse_args()
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="lensmith-flywheel-"))
    (work / "prefect-home").mkdir(parents=True, exist_ok=True)
    try:
        result = {"machine": platform.machine(), "cpu_flags": cpu_flags(), **one_turn(work, args)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    out = REPO / "reports" / "bench" / "flywheel.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
