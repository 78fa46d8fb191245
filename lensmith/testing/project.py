"""A throw-away Lensmith project (git + DVC) in a temp dir, with tiny params so real stages run fast.

Test support (see lensmith.testing): it copies the source checkout this package lives in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lensmith.params import apply_overrides, params_from_dict, read_params_yaml
from lensmith.reviewed import ensure_reviewed_folder

PACKAGE = Path(__file__).resolve().parents[1]  # lensmith/
REPO = PACKAGE.parent  # the checkout: dvc.yaml, params.yaml, lensmith/

# Small but real: demo images, pretrained EfficientNet-Lite0, one epoch.
TINY_OVERRIDES = [
    "demo.per_class=24",
    "demo.image_size=64",
    "validate.min_images_per_class=5",
    "validate.min_width=32",
    "validate.min_height=32",
    "split.min_class_size=5",
    "split.group_column=null",  # 24 images/class are only ~3 batches: too few groups to stratify
    "train.image_size=64",
    "train.epochs=1",
    "train.freeze_epochs=0",
    "train.batch_size=32",
    "evaluate.robustness.severities=[3]",
    "evaluate.worst_examples=4",
    "export.bench_seconds=0.2",  # the int8/fp32 speed figures: 12 s of a 40 s tiny run at the shipped 1.5 s
]

# Gate floors off: tests about the pipeline's mechanics train models too small to pass the shipped floors.
LENIENT_GATE = [
    "gate.min_accuracy=0.0",
    "gate.min_macro_f1=0.0",
    "gate.min_positive_recall=0.0",
    "gate.max_ece=1.0",
    "gate.max_robustness_drop=1.0",
    "gate.min_slice_accuracy=0.0",
]


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", GX_ANALYTICS_ENABLED="false")
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def make_project(root: Path, overrides: list[str] | None = None, tiny: bool = True) -> Path:
    """Copy what dvc.yaml depends on (code + pipeline files) into `root`, then git init + dvc init.
    tiny=False: the shipped params.yaml with only `overrides` applied."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "prefect.yaml"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(PACKAGE, root / "lensmith", ignore=shutil.ignore_patterns("__pycache__"))
    raw = apply_overrides(read_params_yaml(REPO / "params.yaml"), (TINY_OVERRIDES if tiny else []) + list(overrides or []))
    params_from_dict(raw, "tiny test params")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ensure_reviewed_folder(root / raw.get("data", {}).get("reviewed_dir", "data/reviewed"))  # ingest's dep, in git
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "tests@lensmith.local"], root)
    run(["git", "config", "user.name", "lensmith tests"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    run([sys.executable, "-m", "dvc", "config", "core.autostage", "true"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "test project"], root)
    return root
