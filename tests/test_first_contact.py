"""First contact: real image sets the project does not generate, as a user would bring them.

scikit-learn's digits (image folder, no metadata), scikit-image's LFW face crops (CSV manifest, no
metadata), Debian's Fashion-MNIST (CSV manifest with a metadata column) and scikit-image's texture
photographs (S3 prefix on SeaweedFS, with metadata.csv). Each goes through `lensmith run` twice: with
the shipped params.yaml and only `data.source` changed, and in a project made by `lensmith init`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lensmith.procutil import free_port
from lensmith.sampledata import FASHION_MNIST_DIR, write_sample_set
from lensmith.testing.project import LENIENT_GATE, make_project, run, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPORTS = (
    "validation.json", "validation.html", "leakage.json", "leakage.html", "metrics.json", "evaluation.html",
    "export.json", "gate.json", "gate.html",
)


@dataclass(frozen=True)
class Case:
    name: str
    sample: str  # lensmith.sampledata set
    layout: str  # folder | csv
    metadata: bool
    per_class: int | None  # images per class for `lensmith init` (the shipped-params run gets 20: it is about the path)
    s3: bool = False
    accuracy_floor: float = 0.0  # test accuracy a project made by `lensmith init` must reach

    def source_key(self, shipped: bool) -> str:
        return f"{self.name}-{'shipped' if shipped else 'init'}"


SHIPPED_PER_CLASS = 20  # the shipped validate.min_images_per_class
CASES = [
    Case("folder", "digits", "folder", False, 60, accuracy_floor=0.9),
    Case("csv", "faces", "csv", False, None, accuracy_floor=0.75),
    Case("csv-metadata", "fashion", "csv", True, 40, accuracy_floor=0.6),
    Case("s3", "textures", "folder", True, 40, s3=True, accuracy_floor=0.85),
]


def lensmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "lensmith.cli", *args]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, s3_server) -> dict[str, str]:  # noqa: ANN001
    """Each case's data.source: a folder, a CSV file, or an s3:// prefix holding the uploaded folder."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Debian's dataset-fashion-mnist is not installed: `make install-dev` installs it (system-deps)")
    root = tmp_path_factory.mktemp("sources")
    found: dict[str, str] = {}
    for case in CASES:
        for shipped in (True, False):
            key = case.source_key(shipped)
            folder = root / key
            per_class = SHIPPED_PER_CLASS if shipped else case.per_class
            write_sample_set(case.sample, folder, per_class=per_class, layout=case.layout, metadata=case.metadata)
            if case.s3:
                bucket = s3_server.make_bucket("firstcontact")
                s3_server.upload_tree(folder, bucket, "textures")
                found[key] = f"s3://{bucket}/textures"
            else:
                found[key] = str(folder / "manifest.csv") if case.layout == "csv" else str(folder)
    return found


def env_for(case: Case, s3_server) -> dict[str, str]:  # noqa: ANN001
    return tool_env(s3_server.env if case.s3 else None)


def s3_overrides(case: Case, s3_server) -> list[str]:  # noqa: ANN001
    return [f"data.s3_endpoint_url={s3_server.endpoint_url}"] if case.s3 else []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_shipped_params_with_only_the_source_changed_run_to_every_report(
    case: Case, sources: dict[str, str], s3_server, tmp_path: Path  # noqa: ANN001
) -> None:
    project = make_project(tmp_path / "proj", [f"data.source={sources[case.source_key(shipped=True)]}", *s3_overrides(case, s3_server)], tiny=False)
    proc = run(lensmith("run"), project, env=env_for(case, s3_server), timeout=1500)
    assert "registry: " in proc.stdout, proc.stdout
    reports = project / "reports"
    missing = [name for name in REPORTS if not (reports / name).is_file()]
    assert not missing, missing
    validation = json.loads((reports / "validation.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    resolved = validation["resolved"]
    if case.metadata:
        assert resolved["validate.required_metadata"] and resolved["evaluate.slices"] == resolved["validate.required_metadata"]
        assert set(metrics["slices"]) == set(resolved["evaluate.slices"])
    else:
        assert resolved["validate.required_metadata"] == [] and metrics["slices"] == {}
    assert resolved["evaluate.negative_class"] is None and metrics["test"]["positive_class"] is None  # no ok/good label
    gate = json.loads((reports / "gate.json").read_text())
    recall = next(c for c in gate["checks"] if c["name"] == "floor.min_positive_recall")
    assert "does not apply" in recall["detail"]
    assert json.loads((project / "models" / "candidate" / "meta.json").read_text())["resolved"]["evaluate.negative_class"] is None
    status = run([sys.executable, "-m", "dvc", "status", "--json"], project, env=env_for(case, s3_server))
    assert status.stdout.strip() == "{}", status.stdout


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_init_then_run_reaches_the_accuracy_floor(
    case: Case, sources: dict[str, str], s3_server, tmp_path: Path  # noqa: ANN001
) -> None:
    env = env_for(case, s3_server)
    args = ["init", sources[case.source_key(shipped=False)], "proj"] + (["--s3-endpoint-url", s3_server.endpoint_url] if case.s3 else [])
    if case.sample == "textures":
        args += ["--orientation", "free"]
    if case.s3:
        args += ["--remote", f"s3://{s3_server.make_bucket('remote')}/dvc"]
    init = run(lensmith(*args), tmp_path, env=env)
    assert "next:" in init.stdout and "lensmith run" in init.stdout, init.stdout
    project = tmp_path / "proj"
    assert run(["git", "status", "--porcelain"], project).stdout.strip() == ""  # init committed what it wrote
    if not case.s3:  # a local source is copied into the project and versioned by DVC
        assert (project / "data" / "raw" / f"{case.source_key(shipped=False)}.dvc").is_file()
    else:
        assert "['remote \"storage\"']" in (project / ".dvc" / "config").read_text()
    run(lensmith("run"), project, env=env, timeout=1500)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= case.accuracy_floor, metrics["test"]
    assert run([sys.executable, "-m", "dvc", "status", "--json"], project, env=env).stdout.strip() == "{}"


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lensmith: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_init_refuses_unusable_sources_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    one_class = tmp_path / "one"
    write_sample_set("digits", one_class, per_class=12)
    for folder in (one_class / str(d) for d in range(1, 10)):
        shutil.rmtree(folder)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,class\na.png,x\n")
    closed = f"http://127.0.0.1:{free_port()}"
    cases = {
        "no images found": [str(empty)],
        "holds one class": [str(one_class)],
        "needs columns path,label": [str(bad_csv)],
        "127.0.0.1": ["s3://bucket/prefix", "--s3-endpoint-url", closed],
    }
    env = tool_env({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"})
    for expected, source_args in cases.items():
        target = tmp_path / "proj"
        proc = run(lensmith("init", source_args[0], str(target), *source_args[1:]), tmp_path, env=env, check=False, timeout=120)
        assert expected in one_line_error(proc)
        assert not target.exists()


def test_init_never_overwrites_a_project(tmp_path: Path) -> None:
    write_sample_set("digits", tmp_path / "digits", per_class=12)
    target = tmp_path / "proj"
    target.mkdir()
    (target / "params.yaml").write_text("train:\n  epochs: 3\n")
    proc = run(lensmith("init", str(tmp_path / "digits"), str(target)), tmp_path, check=False)
    assert "never overwrites" in one_line_error(proc)
    assert (target / "params.yaml").read_text() == "train:\n  epochs: 3\n" and sorted(p.name for p in target.iterdir()) == ["params.yaml"]


@pytest.fixture
def served_project(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A demo project after `lensmith run` (tiny params, floors relaxed: this is about the path, not the model)."""
    project = make_project(tmp_path / "proj", [*LENIENT_GATE, "export.int8=false"])
    proc = run(lensmith("run"), project, timeout=1500)
    assert "registered v0001 and promoted it to production" in proc.stdout, proc.stdout
    port = free_port()
    log = open(project / "serve.log", "w")
    server = subprocess.Popen(
        lensmith("serve", "--port", str(port)), cwd=project, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, (project / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield project, url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_run_registers_and_promotes_so_serve_answers(served_project: tuple[Path, str]) -> None:
    project, url = served_project
    image = next((project / "data" / "raw" / "demo").rglob("*.jpg"))
    answer = httpx.post(f"{url}/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == "v0001" and len(body["predictions"]) == 1
    listed = run(lensmith("models", "list"), project)
    assert "* v0001" in listed.stdout
