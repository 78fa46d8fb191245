"""Orchestration overhead and the no-op nightly run.

A: the pipeline through the Prefect training flow (`lensmith run`: a temporary Prefect server the CLI
   starts, one task per stage, each reproducing its DVC stage (DVC decides staleness and records dvc.lock
   and the cache; tasks/dvc_inprocess.py), artifacts published);
B: the same stages called directly in one process (lensmith.stages.run_stage), no Prefect, no DVC.
Both start from the same fresh project (same params, same data); rounds alternate A/B and medians are
reported. Then: a no-op nightly run (nothing changed) end to end through the CLI.

    .venv/bin/python bench/orchestration.py [--per-class 100] [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lensmith.stages import TRAINING_STAGES  # noqa: E402
from lensmith.testing.project import make_project, tool_env  # noqa: E402


def fresh_project(base: Path, name: str, overrides: list[str]) -> Path:
    return make_project(base / name, overrides)


def time_flow(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lensmith.cli", "run"], cwd=root, env=tool_env(), check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - start


def time_direct(root: Path) -> float:
    """All stages in-process, in a child interpreter so imports are paid like in A."""
    code = (
        "import sys; from pathlib import Path; from lensmith.params import load_params; from lensmith.layout import Layout;"
        "from lensmith.stages import TRAINING_STAGES, run_stage;"
        "root = Path(sys.argv[1]); params = load_params(root / 'params.yaml'); layout = Layout(root);"
        "[run_stage(s, params, layout) for s in TRAINING_STAGES]"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(root)], cwd=root, env=tool_env(), check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def time_noop_nightly(root: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lensmith.cli", "nightly"], cwd=root, env=tool_env(), check=True,
                          capture_output=True, text=True)
    assert "no-op" in proc.stdout, proc.stdout
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    overrides = [f"demo.per_class={args.per_class}", f"train.epochs={args.epochs}", "nightly.push=false",
                 "split.group_column=batch"]
    base = Path(tempfile.mkdtemp(prefix="lensmith-bench-orch-"))
    flow_s, direct_s = [], []
    try:
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for which in order:
                root = fresh_project(base, f"{which}{r}", overrides)
                seconds = time_flow(root) if which == "A" else time_direct(root)
                (flow_s if which == "A" else direct_s).append(seconds)
                print(f"round {r + 1} {'flow  ' if which == 'A' else 'direct'}: {seconds:6.1f} s", flush=True)
        a, b = statistics.median(flow_s), statistics.median(direct_s)
        print(f"\nfull demo pipeline ({args.per_class}/class, {args.epochs} epochs, {len(TRAINING_STAGES)} stages), medians of {args.rounds}:")
        print(f"  Prefect flow + DVC: {a:.1f} s   direct calls: {b:.1f} s   overhead {100 * (a / b - 1):+.1f}% (target <= +10%)")
        noop_root = base / f"A{args.rounds - 1}" if args.rounds % 2 else base / "A0"
        subprocess.run(["git", "add", "-A"], cwd=noop_root, check=True, capture_output=True)
        subprocess.run(["git", "commit", "-qm", "bench state"], cwd=noop_root, check=True, capture_output=True)
        noop = [time_noop_nightly(noop_root) for _ in range(3)]
        print(f"  no-op nightly (nothing changed, no remote): median {statistics.median(noop):.1f} s of {['%.1f' % s for s in noop]} (target <= 20 s)")
        print(f"  load average at end: {os.getloadavg()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
