"""One turn of the flywheel against a running project, service and Prefect server (test support and bench).

The steps a plant goes through, each through the real interface: site-C images served with their context,
corrected through /v1/feedback, exported for review and imported into the reviewed-data source; the
monitoring deployment run through Prefect with `where site=C`, which starts the nightly deployment; traffic
kept flowing while the service hot-reloads; accuracy and drift of a fresh site-C window before and after.
Used by tests/test_flywheel_loop.py (small images) and bench/flywheel.py (the demo's size).
"""

from __future__ import annotations

import csv
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lensmith.procutil import free_port
from lensmith.testing.background import background
from lensmith.testing.project import run

CONTEXT_COLUMNS = ("site", "lighting", "camera", "batch")
API_TOKEN = "flywheel-reviewer-token"  # feedback needs the service's LENSMITH_API_TOKEN


def lensmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "lensmith.cli", *args]


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: str
    context: dict[str, str]


def demo_site_images(project: Path, out: Path, site: str, seed: int, per_class: int) -> list[Labelled]:
    """Demo images of one site written to `out` by `lensmith demo-data`, with their labels and metadata."""
    run(lensmith("demo-data", "--site", site, "--seed", str(seed), "--per-class", str(per_class), "--out", str(out)), project)
    with open(out / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [Labelled(out / row["path"], row["label"], {c: row[c] for c in CONTEXT_COLUMNS if c in row}) for row in rows]


def predict(client: httpx.Client, url: str, image: Labelled, context: bool = True) -> dict[str, Any]:
    answer = client.post(
        f"{url}/v1/predict", files={"file": (image.path.name, image.path.read_bytes(), "image/jpeg")},
        data=image.context if context else None,
    )
    if answer.status_code != 200:
        raise AssertionError(f"predict answered {answer.status_code}: {answer.text[:500]}")
    return answer.json()


def served_accuracy(url: str, images: list[Labelled]) -> tuple[float, str]:
    """Share of `images` the served model labels right, and the one model version that answered."""
    with httpx.Client(timeout=60) as client:
        answers = [predict(client, url, image) for image in images]
    versions = {a["model_version"] for a in answers}
    if len(versions) != 1:
        raise AssertionError(f"several model versions answered one window: {versions}")
    right = sum(a["predictions"][0]["label"] == image.label for a, image in zip(answers, images))
    return right / len(images), versions.pop()


def correct_through_feedback(url: str, images: list[Labelled]) -> int:
    """Serve each image with its context, then send its true label as feedback; returns the feedback count."""
    sent = 0
    with httpx.Client(timeout=60) as client:
        for image in images:
            prediction = predict(client, url, image)["predictions"][0]
            if prediction.get("context") != image.context:
                raise AssertionError(f"context not echoed: {prediction.get('context')} != {image.context}")
            answer = client.post(f"{url}/v1/feedback", json={"prediction_id": prediction["id"], "label": image.label},
                                 headers={"Authorization": f"Bearer {API_TOKEN}"})
            if answer.status_code != 201:
                raise AssertionError(f"feedback answered {answer.status_code}: {answer.text[:500]}")
            sent += 1
    return sent


def review_round_trip(project: Path, folder: Path) -> str:
    """`review export`, the reviewer confirms every feedback label in review.csv, `review import`; its output."""
    run(lensmith("review", "export", "--out", str(folder)), project)
    table = folder / "review.csv"
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["corrected_label"] = row["feedback_label"] if row["reason"] == "feedback" else ""
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run(lensmith("review", "import", str(table)), project).stdout


def drift_figures(project: Path, window: Path, env: dict[str, str] | None = None, model: str = "production") -> tuple[float, float | None]:
    """`lensmith drift` of a labelled folder against `model`'s reference: (drifted share, the model's accuracy on it)."""
    run(lensmith("drift", "--current", str(window), "--model", model), project, env=env)
    report = json.loads((project / "reports" / "drift.json").read_text())
    quality = report.get("classification") or {}
    return float(report["drifted_share"]), quality.get("accuracy")


def drifted_share(project: Path, window: Path, env: dict[str, str] | None = None) -> float:
    """`lensmith drift` of a folder against production's reference: the share of drifted columns."""
    return drift_figures(project, window, env)[0]


@dataclass
class Traffic:
    """Requests sent from a thread every `interval_s` while something else happens; every status is kept."""

    url: str
    image: Labelled
    interval_s: float = 0.02  # ~50 requests/s: steady traffic that leaves the cores to the retraining
    statuses: list[int] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    def wait_for_version(self, version: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while version not in self.versions and time.monotonic() < deadline:
            time.sleep(0.2)
        return version in self.versions

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                answer = client.post(
                    f"{self.url}/v1/predict", files={"file": (self.image.path.name, self.image.path.read_bytes(), "image/jpeg")}
                )
                self.statuses.append(answer.status_code)
                if answer.status_code == 200:
                    self.versions.add(answer.json()["model_version"])
                self.stop.wait(self.interval_s)


@contextmanager
def running_service(project: Path, env: dict[str, str], ready_timeout_s: float = 120) -> Iterator[str]:
    """`lensmith serve` (production from the registry) on a free port; yields its URL once /v1/ready is 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "LENSMITH_API_TOKEN": API_TOKEN}
    with background(lensmith("serve", "--port", str(port)), project, env, project / "serve.log") as proc:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the service did not become ready:\n" + (project / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url


def running_schedule(project: Path, env: dict[str, str]) -> Any:
    """`lensmith schedule` (the nightly and monitoring deployments served) against env's PREFECT_API_URL."""
    return background(lensmith("schedule"), project, env, project / "schedule.log", stop=signal.SIGINT)
