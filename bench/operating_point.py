"""The plant's figures and what they cost, on a project where `lensmith run` finished (production set):

- the evaluate stage's wall time (the served ONNX model on the test split, robustness suite included), median of
  --rounds runs of `lensmith evaluate` in fresh processes (interpreter start and imports included, as in a stage);
- the test split at the operating point the export chose on validation (defect recall, false-alarm rate, ...);
- the gate's extra cost of re-scoring production on the same split (gate.json `champion_rescore_seconds`).

    python bench/operating_point.py --project /path/to/project [--rounds 3]

Writes reports/bench/operating_point.json in this checkout. Run it on a quiet machine: it times CPU work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project where `lensmith run` finished")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    project = args.project.resolve()
    lensmith = [sys.executable, "-m", "lensmith.cli"]
    evaluate_s = [timed([*lensmith, "evaluate", "--root", str(project)], project) for _ in range(args.rounds)]
    gate_s = timed([*lensmith, "gate", "--report-only", "--root", str(project)], project)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    gate = json.loads((project / "reports" / "gate.json").read_text())
    decision = metrics.get("decision", {})
    result = {
        "evaluate_wall_s": {"median": statistics.median(evaluate_s), "rounds": evaluate_s},
        "served": metrics.get("served"),
        "test_n": metrics["test"]["n"],
        "rule": decision.get("rule"),
        "test_at_operating_point": decision.get("test"),
        "argmax": {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                   "positive_recall": (metrics["test"].get("positive_class") or {}).get("recall")},
        "gate_wall_s": gate_s,
        "gate_champion": gate.get("champion_version"),
        "gate_champion_compared": gate.get("champion_compared"),
        "gate_rescore_s": gate.get("champion_rescore_seconds"),
    }
    out = REPO / "reports" / "bench" / "operating_point.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    at = result["test_at_operating_point"] or {}
    print(f"evaluate stage: median {result['evaluate_wall_s']['median']:.1f} s of {args.rounds} (target <= 60 s); "
          f"served {result['served']}")
    print(f"test split at the operating point ({(result['rule'] or {}).get('kind')}): defect recall {at.get('recall')}, "
          f"false-alarm rate {at.get('false_alarm_rate')}, precision {at.get('precision')}, review rate "
          f"{at.get('review_rate')}, missed {at.get('missed_defects')}, false alarms {at.get('false_alarms')} of n={result['test_n']}")
    print(f"gate with production {result['gate_champion']} ({result['gate_champion_compared']}): wall {gate_s:.1f} s, "
          f"re-scoring production {result['gate_rescore_s']} s (target <= 15 s)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
