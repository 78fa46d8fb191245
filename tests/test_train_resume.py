"""Kill a real `lensmith train` process after its first checkpoint, resume it, and compare the final
weights with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lensmith.layout import Layout
from lensmith.modelio import state_dict_sha256

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_project  # noqa: E402

LENSMITH = [sys.executable, "-c", "from lensmith.cli import app; app()"]
PARAMS = """\
train:
  model: efficientnet_lite0
  pretrained: true
  image_size: 32
  epochs: 4
  batch_size: 8
  freeze_epochs: 1
  num_threads: 1
"""


def project_with_params(root: Path) -> Layout:
    layout = make_project(root, per_class=24)
    (root / "params.yaml").write_text(PARAMS)
    return layout


def lensmith_train(root: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*LENSMITH, "train", "--params", str(root / "params.yaml"), "--root", str(root), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )


def final_weights_sha256(layout: Layout) -> str:
    return state_dict_sha256(torch.load(layout.candidate / "model.pt", weights_only=True)["state_dict"])


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    killed = project_with_params(tmp_path / "killed")
    process = lensmith_train(killed.root)
    checkpoint = killed.candidate / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0].decode()
    assert process.returncode == -signal.SIGKILL, f"training ended before it could be killed:\n{output}"
    saved = torch.load(checkpoint, weights_only=True)
    assert 1 <= saved["progress"]["epoch"] < 4
    assert not (killed.candidate / "model.pt").exists()

    resumed = lensmith_train(killed.root, "--resume")
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output
    assert "resuming from" in output

    reference = project_with_params(tmp_path / "reference")
    straight = lensmith_train(reference.root)
    output = straight.communicate(timeout=600)[0].decode()
    assert straight.returncode == 0, output

    assert final_weights_sha256(killed) == final_weights_sha256(reference)
    meta_killed = json.loads((killed.candidate / "meta.json").read_text())
    meta_reference = json.loads((reference.candidate / "meta.json").read_text())
    assert meta_killed["best_epoch"] == meta_reference["best_epoch"]
    assert [h["val_loss"] for h in meta_killed["history"]] == [h["val_loss"] for h in meta_reference["history"]]


def test_cli_reports_a_missing_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    layout = project_with_params(tmp_path / "p")
    process = lensmith_train(layout.root, "--resume")
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 1
    assert "lensmith: --resume: no checkpoint at" in output and "Traceback" not in output
