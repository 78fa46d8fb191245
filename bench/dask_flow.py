"""The training flow on a local Dask cluster of 2 worker processes vs the thread runner (issue #19).

A: `lensmith run` (thread runner, the default); B: `lensmith run --set orchestration.task_runner=dask` (a local
cluster of `--workers` processes, 1 thread each). Each run starts from a fresh project with the same params and
data; rounds alternate A/B and medians are reported, with per-stage medians from the CLI's own stage times. Every
B run's reports/metrics.json (less the run-dependent fields tests/test_dask_flow.py names) and weights must equal
the first A run's.

    .venv/bin/python bench/dask_flow.py [--per-class 24] [--epochs 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lensmith.testing.project import make_project, tool_env  # noqa: E402

RUN_DEPENDENT_KEYS = frozenset({"throughput", "git_commit", "data_hash"})  # as in tests/test_dask_flow.py
STAGE_LINE = re.compile(r"^  (\w+)\s+(ran|unchanged) \(([\d.]+)s\)$")


def cpu_flags() -> str:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags) or "none of avx2/avx512f/avx512_vnni"


def timed_run(root: Path, sets: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of `lensmith run` and the stage seconds it printed."""
    command = [sys.executable, "-m", "lensmith.cli", "run"]
    for setting in sets:
        command += ["--set", setting]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=root, env=tool_env(), check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    stages = {m[1]: float(m[3]) for m in map(STAGE_LINE.match, proc.stdout.splitlines()) if m}
    return seconds, stages


def comparable_metrics(root: Path) -> str:
    def strip(doc: Any) -> Any:
        if isinstance(doc, dict):
            return {k: strip(v) for k, v in doc.items() if k not in RUN_DEPENDENT_KEYS}
        return [strip(v) for v in doc] if isinstance(doc, list) else doc

    return json.dumps(strip(json.loads((root / "reports" / "metrics.json").read_text())), sort_keys=True)


def weights_sha256(root: Path) -> str:
    import torch

    state = torch.load(root / "models" / "candidate" / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    overrides = [f"demo.per_class={args.per_class}", f"train.epochs={args.epochs}"]
    runners = {"A": ["orchestration.task_runner=thread"],
               "B": ["orchestration.task_runner=dask", f"orchestration.dask_n_workers={args.workers}"]}
    names = {"A": "thread", "B": f"dask {args.workers}w"}
    base = Path(tempfile.mkdtemp(prefix="lensmith-bench-dask-"))
    walls: dict[str, list[float]] = {"A": [], "B": []}
    stage_times: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    reference: tuple[str, str] | None = None
    identical = True
    try:
        for r in range(args.rounds):
            for which in ("A", "B") if r % 2 == 0 else ("B", "A"):
                root = make_project(base / f"{which}{r}", overrides)
                seconds, stages = timed_run(root, runners[which])
                walls[which].append(seconds)
                for stage, s in stages.items():
                    stage_times[which].setdefault(stage, []).append(s)
                outcome = (comparable_metrics(root), weights_sha256(root))
                reference = reference or outcome
                identical &= outcome == reference
                print(f"round {r + 1} {names[which]:<9}: {seconds:6.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
                shutil.rmtree(root, ignore_errors=True)
        a, b = statistics.median(walls["A"]), statistics.median(walls["B"])
        print(f"\ntraining flow ({args.per_class}/class, {args.epochs} epoch(s), tiny test settings), medians of {args.rounds}:")
        print(f"  thread runner {a:.1f} s   dask {args.workers} workers {b:.1f} s   ratio dask/thread {b / a:.2f}x")
        print(f"  metrics (less run-dependent fields) and weights identical in every run: {identical}")
        print("  stage medians (s):  " + "  ".join(
            f"{stage} {statistics.median(stage_times['A'][stage]):.1f}/{statistics.median(stage_times['B'].get(stage, [0])):.1f}"
            for stage in stage_times["A"]))
        print(f"  cores {len(os.sched_getaffinity(0))}, CPU flags: {cpu_flags()}, load average at end {os.getloadavg()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
