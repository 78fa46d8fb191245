"""First contact, timed: a user's own image folder through `lensmith init` + `lensmith run`, and through the
shipped params.yaml with only data.source changed.

  .venv/bin/python bench/first_contact.py [--set digits|fashion|faces|textures] [--per-class N] [--shipped]

For the chosen real image set (lensmith.sampledata: scikit-learn digits, Fashion-MNIST from Debian, ...) it
writes the images as a plain <class>/<file> folder, then, timing from the first command:
  init  `lensmith init FOLDER PROJECT` -> `lensmith run` in PROJECT; seconds until reports/evaluation.html
        exists, the whole run's seconds, test accuracy, gate decision, registry outcome;
  --shipped also a project with the repository's params.yaml and only data.source changed: exit code,
        seconds, test accuracy, gate decision.
Prints one line per figure and the CPU flags that change them (avx2, avx512f, avx512_vnni). Run it on a
quiet machine: it trains, and training slows ~5x next to another CPU-heavy process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import cpu_flags  # noqa: E402
from lensmith.sampledata import write_sample_set  # noqa: E402


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", GX_ANALYTICS_ENABLED="false")
    return env


def lensmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "lensmith.cli", *args]


def timed_run(cmd: list[str], cwd: Path, started: float, log: Path) -> tuple[int, float, float | None]:
    """(exit code, seconds since `started` at exit, seconds since `started` when evaluation.html appeared)."""
    evaluation = cwd / "reports" / "evaluation.html"
    first_report = None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first_report is None and evaluation.is_file():
                first_report = time.perf_counter() - started
            time.sleep(0.5)
    if first_report is None and evaluation.is_file():
        first_report = time.perf_counter() - started
    return proc.returncode, time.perf_counter() - started, first_report


def outcome(project: Path) -> dict[str, object]:
    metrics = json.loads((project / "reports" / "metrics.json").read_text()) if (project / "reports" / "metrics.json").is_file() else {}
    gate = json.loads((project / "reports" / "gate.json").read_text()) if (project / "reports" / "gate.json").is_file() else {}
    return {
        "accuracy": (metrics.get("test") or {}).get("accuracy"),
        "gate": gate.get("decision"),
        "gate_reasons": gate.get("reasons"),
    }


def shipped_project(root: Path, source: Path) -> Path:
    import yaml

    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "lensmith", root / "lensmith", ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(source)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "bench"]):
        subprocess.run(cmd, cwd=root, check=True, env=tool_env(), capture_output=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sample", default="digits", choices=["digits", "fashion", "faces", "textures"])
    parser.add_argument("--per-class", type=int, default=None, help="images per class (default: all; fashion: 500)")
    parser.add_argument("--shipped", action="store_true", help="also run the shipped params with only data.source changed")
    parser.add_argument("--keep", type=Path, default=None, help="keep the projects under this folder")
    args = parser.parse_args()
    per_class = args.per_class if args.per_class is not None else (500 if args.sample == "fashion" else None)
    work = Path(tempfile.mkdtemp(prefix="lensmith-first-contact-")) if args.keep is None else args.keep
    folder = work / args.sample
    sample = write_sample_set(args.sample, folder, per_class=per_class)
    print(f"data: {sample}; cpu flags: {cpu_flags()}")

    started = time.perf_counter()
    init = subprocess.run(lensmith("init", str(folder), str(work / "init-project")), cwd=work, env=tool_env(),
                          capture_output=True, text=True, check=False)
    if init.returncode != 0:
        raise SystemExit(f"lensmith init failed: {init.stderr.strip()}")
    project = work / "init-project"
    code, total, first_report = timed_run(lensmith("run"), project, started, work / "init-run.log")
    result = outcome(project)
    shown = "none (see init-run.log)" if first_report is None else f"{first_report:.1f} s"
    print(f"init: exit {code}; init -> first evaluation report {shown}; whole run {total:.1f} s; "
          f"test accuracy {result['accuracy']}; gate {result['gate']} {result['gate_reasons'] or ''}")
    registry = [line for line in (work / "init-run.log").read_text().splitlines() if line.startswith("registry:")]
    print(f"init: {registry[-1] if registry else 'registry: (no line)'}")

    if args.shipped:
        project = shipped_project(work / "shipped-project", folder)
        started = time.perf_counter()
        code, total, first_report = timed_run(lensmith("run"), project, started, work / "shipped-run.log")
        result = outcome(project)
        print(f"shipped params, only data.source changed: exit {code}; whole run {total:.1f} s; "
              f"test accuracy {result['accuracy']}; gate {result['gate']} {result['gate_reasons'] or ''}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
