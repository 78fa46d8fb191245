"""`lensmith init SOURCE [DIR]`: look at a data set, choose params that suit it, set up a project for it.

The inspection reads the source the way ingest does (folder, CSV manifest, shard folder or s3:// prefix)
and opens a seeded sample of the images (headers and bytes: sizes, modes, exact duplicates). The
choices are plain rules, printed with their reason; params.yaml holds them, so the run that follows
is reproducible and every choice can be edited. Nothing is written until every check has passed,
and an existing project (params.yaml or dvc.yaml in DIR) is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from PIL import Image

from lensmith.errors import LensmithError
from lensmith.layout import Layout
from lensmith.params import DataParams, Params, params_from_dict
from lensmith.resolve import group_column_of, metadata_columns, negative_class_of, slice_columns_of
from lensmith.reviewed import ensure_reviewed_folder, git_tracked_paths
from lensmith.sources import is_s3_uri, list_source, local_source_path

SAMPLE_IMAGES = 1000  # images opened to measure sizes and modes (seeded, spread over classes)
PROJECT_FILES = ("params.yaml", "dvc.yaml")
ORIENTATIONS = ("fixed", "mirror", "free")
CPU_IMAGES_PER_S = {64: 350.0, 96: 180.0, 128: 110.0, 160: 70.0, 224: 35.0}  # EfficientNet-Lite0 training, 2 cores


class InitError(LensmithError):
    """The source cannot make a project (no images, one class, unreadable...) or DIR is taken."""


@dataclass
class Inspection:
    source: str
    description: str
    class_counts: dict[str, int]
    rejected: int
    metadata: pd.DataFrame | None
    sampled: int
    median_side: float
    smallest_side: int
    largest_side: int
    modes: dict[str, int]
    formats: dict[str, int]
    duplicate_files: int  # sampled images whose bytes repeat another sampled image

    @property
    def n_images(self) -> int:
        return sum(self.class_counts.values())

    @property
    def metadata_columns(self) -> list[str]:
        return metadata_columns(list(self.metadata.columns)) if self.metadata is not None else []

    @property
    def imbalance(self) -> float:
        counts = list(self.class_counts.values())
        return max(counts) / max(min(counts), 1)


@dataclass
class Choice:
    key: str
    value: Any
    why: str


@dataclass
class InitPlan:
    inspection: Inspection
    choices: list[Choice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def choose(self, key: str, value: Any, why: str) -> None:
        self.choices.append(Choice(key, value, why))

    def overrides(self) -> dict[str, Any]:
        return {c.key: c.value for c in self.choices}


# ---- inspecting --------------------------------------------------------------------------------------


def inspect_source(source: str, s3_endpoint_url: str | None = None, sample: int = SAMPLE_IMAGES, seed: int = 0) -> Inspection:
    """Classes, counts, metadata and a sample's sizes/modes/duplicates; raises InitError when unusable."""
    from lensmith.ingest import decode_limits, read_item_bytes
    from lensmith.sources import s3_settings

    data = DataParams(source=source, s3_endpoint_url=s3_endpoint_url)
    with tempfile.TemporaryDirectory(prefix="lensmith-init-") as scratch:  # S3 objects are mirrored here, then dropped
        layout = Layout(Path(scratch))
        try:
            listing = list_source(data, layout)
        except LensmithError as exc:
            raise InitError(str(exc)) from None
        counts = Counter(item.label for item in listing.items)
        if not counts:
            raise InitError(
                f"no images found in {listing.description}: expected <class>/<file> folders (or a CSV path,label) "
                f"with files of type {', '.join(data.image_extensions)}"
            )
        if len(counts) < 2:
            only = next(iter(counts))
            raise InitError(
                f"{listing.description} holds one class ({only!r}, {counts[only]} images): a classifier needs at "
                "least two, each in its own <class>/ folder (or label in the CSV)"
            )
        rng = random.Random(seed)
        items = list(listing.items)
        rng.shuffle(items)
        chosen = _spread_over_classes(items, sample)
        limits = decode_limits(Params(data=data))
        sides, modes, formats, digests = [], Counter(), Counter(), Counter()
        unreadable = 0
        for item in chosen:
            try:
                blob = read_item_bytes(item, limits, s3_settings(data))
                with Image.open(io.BytesIO(blob)) as img:
                    sides.append((img.width, img.height))
                    modes[img.mode] += 1
                    formats[img.format or "?"] += 1
                digests[hashlib.sha256(blob).hexdigest()] += 1
            except Exception:  # noqa: BLE001 - any unreadable sample is counted; ingest will quarantine it with a reason
                unreadable += 1
        if not sides:
            raise InitError(f"none of the {len(chosen)} sampled files in {listing.description} could be opened as an image")
    short = sorted(min(w, h) for w, h in sides)
    return Inspection(
        source=source,
        description=listing.description,
        class_counts=dict(sorted(counts.items())),
        rejected=len(listing.rejections) + unreadable,
        metadata=listing.metadata,
        sampled=len(sides),
        median_side=float(short[len(short) // 2]),
        smallest_side=short[0],
        largest_side=max(max(w, h) for w, h in sides),
        modes=dict(modes),
        formats=dict(formats),
        duplicate_files=sum(n - 1 for n in digests.values() if n > 1),
    )


def _spread_over_classes(items: list[Any], sample: int) -> list[Any]:
    """Up to `sample` items, as many from each class as fit (round robin over the shuffled items)."""
    by_class: dict[str, list[Any]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    chosen: list[Any] = []
    queues = list(by_class.values())
    while len(chosen) < sample and any(queues):
        for queue in queues:
            if queue and len(chosen) < sample:
                chosen.append(queue.pop())
    return chosen


# ---- choosing ----------------------------------------------------------------------------------------


def image_size_for(median_side: float) -> int:
    """Model input size: small images are upscaled to 64 px (two 2x2 feature maps more than 32 px keeps);
    larger ones go to 96/128 px, what a CPU trains in minutes. A GPU user can raise train.image_size."""
    for size in (64, 96):
        if median_side <= size:
            return size
    return 128


def epochs_for(n_images: int) -> int:
    if n_images < 2_000:
        return 12
    if n_images < 20_000:
        return 10
    if n_images < 100_000:
        return 6
    return 4


def plan_for(inspection: Inspection, orientation: str = "fixed") -> InitPlan:
    """The params `init` writes for this data, each with why."""
    if orientation not in ORIENTATIONS:
        raise InitError(f"--orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    plan = InitPlan(inspection)
    n, counts = inspection.n_images, inspection.class_counts
    smallest = min(counts.values())
    if smallest < 10:
        small = ", ".join(f"{k} ({v})" for k, v in counts.items() if v < 10)
        raise InitError(f"class(es) {small} have fewer than 10 images: too few to split into train/val/test; collect more")
    size = image_size_for(inspection.median_side)
    plan.choose("train.image_size", size, f"median shorter side {inspection.median_side:g} px")
    epochs = epochs_for(n)
    plan.choose("train.epochs", epochs, f"{n} images")
    batch = 64 if n >= 1_000 else 32
    plan.choose("train.batch_size", batch, f"{n} images")
    plan.choose("train.early_stopping_patience", 4, "let the cosine schedule run before stopping")
    plan.choose(
        "gate.max_robustness_drop",
        0.5,
        "catches a fragile model; the shipped 0.25 is calibrated to the demo's tiles: tighten it to your deployment's conditions",
    )
    flips = {"fixed": (False, False, 0.0), "mirror": (True, False, 0.0), "free": (True, True, 15.0)}[orientation]
    why = {
        "fixed": "--orientation fixed: a mirrored or rotated image may be another class",
        "mirror": "--orientation mirror: left-right mirror images are the same class",
        "free": "--orientation free: the images have no up (tiles, textures, surfaces)",
    }[orientation]
    plan.choose("train.augment.hflip", flips[0], why)
    plan.choose("train.augment.vflip", flips[1], why)
    plan.choose("train.augment.rotation_degrees", flips[2], why)
    if "RGB" not in inspection.modes and set(inspection.modes) <= {"L", "1", "I;16", "I"}:
        plan.choose("train.augment.saturation", 0.0, "grey images have no saturation")
    min_per_class = min(20, smallest)
    plan.choose("validate.min_images_per_class", min_per_class, f"smallest class has {smallest} images")
    plan.choose("split.min_class_size", min(10, smallest), f"smallest class has {smallest} images")
    if inspection.imbalance > 10:
        limit = float(round(inspection.imbalance * 1.5, 1))
        plan.choose("validate.max_class_imbalance", limit, f"largest/smallest class = {inspection.imbalance:.1f}")
        plan.warnings.append(f"classes are imbalanced ({inspection.imbalance:.1f}x): training weights them (train.class_weights: auto)")
    plan.choose("validate.min_width", min(8, inspection.smallest_side), f"smallest sampled side {inspection.smallest_side} px")
    plan.choose("validate.min_height", min(8, inspection.smallest_side), f"smallest sampled side {inspection.smallest_side} px")

    declared = inspection.metadata_columns
    plan.choose("validate.required_metadata", declared, "the metadata columns the source declares" if declared else "no metadata")
    group = group_column_of(declared)
    plan.choose("split.group_column", group, f"the source's {group!r} column" if group else "no batch/lot column: duplicates only")
    frame = inspection.metadata if inspection.metadata is not None else pd.DataFrame()
    slices, _ = slice_columns_of(frame, declared, group)
    plan.choose("evaluate.slices", slices, "metadata columns with at most 50 values" if slices else "no metadata to slice by")
    negative = negative_class_of(list(counts))
    plan.choose(
        "evaluate.negative_class",
        negative,
        f"the label {negative!r} names the good class" if negative else "no ok/good/normal label: multi-class metrics only",
    )
    if inspection.duplicate_files:
        plan.warnings.append(
            f"{inspection.duplicate_files} of {inspection.sampled} sampled images repeat another file exactly: the split keeps "
            "copies together and validation reports them (validate.sha256_unique)"
        )
    if inspection.rejected:
        plan.warnings.append(f"{inspection.rejected} file(s) could not be listed or opened; ingest will quarantine them with a reason")
    plan.warnings.append(training_time_note(n, size, epochs))
    return plan


def training_time_note(n_images: int, size: int, epochs: int) -> str:
    rate = next((r for s, r in sorted(CPU_IMAGES_PER_S.items()) if size <= s), 30.0)
    seconds = 0.7 * n_images * epochs / rate
    return f"training estimate on a 2-core CPU: ~{seconds / 60:.0f} min ({epochs} epochs of {int(0.7 * n_images)} images at {size} px)"


# ---- writing ---------------------------------------------------------------------------------------------


def template_dvc_yaml() -> dict[str, Any]:
    """The pipeline of the Lensmith checkout this package runs from, without the demo stage and without
    Lensmith's own source files as dependencies (they are not in the new project)."""
    source = Path(__file__).resolve().parents[1] / "dvc.yaml"
    if not source.is_file():
        raise InitError(f"the pipeline definition {source} is missing: install Lensmith from its checkout (make install)")
    pipeline = yaml.safe_load(source.read_text(encoding="utf-8"))
    stages = pipeline["stages"]
    stages.pop("demo_data", None)
    for stage in stages.values():
        deps = [d for d in stage.get("deps", []) if not (isinstance(d, str) and d.startswith("lensmith/"))]
        if deps:
            stage["deps"] = deps
        else:
            stage.pop("deps", None)
    return pipeline


def project_params(plan: InitPlan, source_in_project: str, s3_endpoint_url: str | None) -> dict[str, Any]:
    """The shipped params with the plan's choices and the data source; validated before anything is written."""
    raw = Params().model_dump(mode="json")
    raw["data"]["source"] = source_in_project
    raw["data"]["s3_endpoint_url"] = s3_endpoint_url
    for key, value in plan.overrides().items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    params_from_dict(raw, "the params lensmith init chose")
    return raw


def check_project_dir(project: Path) -> None:
    taken = [name for name in (*PROJECT_FILES, ".dvc") if (project / name).exists()]
    if taken:
        raise InitError(f"{project} already holds a project ({', '.join(taken)}); lensmith init never overwrites one")


def run_tool(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InitError(f"`{' '.join(args)}` failed in {cwd}: {(proc.stderr or proc.stdout).strip()[-400:]}")


def write_project(
    project: Path,
    plan: InitPlan,
    *,
    copy_source: bool = True,
    remote: str | None = None,
    s3_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Create the project: git + DVC, params.yaml, dvc.yaml, the data (copied and `dvc add`ed) or its S3 URI.
    On any failure what this call created is removed again."""
    check_project_dir(project)
    existed = project.exists()
    before = set(project.iterdir()) if existed else set()
    try:
        return _write_project(project, plan, copy_source=copy_source, remote=remote, s3_endpoint_url=s3_endpoint_url)
    except BaseException:
        if not existed:
            shutil.rmtree(project, ignore_errors=True)
        else:
            for path in set(project.iterdir()) - before:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        raise


def _write_project(
    project: Path, plan: InitPlan, *, copy_source: bool, remote: str | None, s3_endpoint_url: str | None
) -> dict[str, Any]:
    source = plan.inspection.source
    copied = None if is_s3_uri(source) or not copy_source else folder_to_copy(local_source_path(source, Layout(Path.cwd())))
    if copied is None:
        source_in_project = source if is_s3_uri(source) else str(local_source_path(source, Layout(Path.cwd())).resolve())
        if not is_s3_uri(source):
            plan.warnings.append(f"data.source refers to {source_in_project} where it is: DVC does not version it")
    else:
        folder, inside = copied
        source_in_project = f"data/raw/{folder.name}" + (f"/{inside}" if inside else "")
    params = project_params(plan, source_in_project, s3_endpoint_url)
    pipeline = template_dvc_yaml()
    project.mkdir(parents=True, exist_ok=True)
    dvc = [sys.executable, "-m", "dvc"]
    run_tool(["git", "init", "-q"], project)
    run_tool([*dvc, "init", "-q"], project)
    run_tool([*dvc, "config", "core.analytics", "false"], project)
    run_tool([*dvc, "config", "core.autostage", "true"], project)
    (project / ".gitignore").write_text("/.cache/\n/.prefect/\n/serving/\n/dvclive/\n__pycache__/\n", encoding="utf-8")
    (project / "params.yaml").write_text(params_yaml_text(plan, params), encoding="utf-8")
    (project / "dvc.yaml").write_text(
        "# Lensmith's pipeline (written by lensmith init). Lensmith's own code is not listed as a dependency:\n"
        "# after upgrading Lensmith, `dvc repro --force` reruns every stage.\n" + yaml.safe_dump(pipeline, sort_keys=False),
        encoding="utf-8",
    )
    tracked = ["params.yaml", "dvc.yaml", ".gitignore"]
    # the reviewed-data folder (human corrections) exists from the start: ingest declares it as a dep
    reviewed = project / params["data"]["reviewed_dir"]
    ensure_reviewed_folder(reviewed)
    tracked += git_tracked_paths(project, reviewed)
    if copied is not None:
        folder, _ = copied
        (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, project / "data" / "raw" / folder.name, symlinks=False)
        run_tool([*dvc, "add", "-q", f"data/raw/{folder.name}"], project)
        tracked += [f"data/raw/{folder.name}.dvc", "data/raw/.gitignore"]
    if remote:
        run_tool([*dvc, "remote", "add", "-d", "storage", remote], project)
        if s3_endpoint_url:
            run_tool([*dvc, "remote", "modify", "storage", "endpointurl", s3_endpoint_url], project)
        tracked.append(".dvc/config")
    run_tool(["git", "add", "-A", "--", *tracked, ".dvc", ".dvcignore"], project)
    # the first commit: training records it (dvclive, meta.json) and later runs diff against it
    run_tool(["git", *git_identity(project), "commit", "-q", "-m", f"lensmith init: project for {plan.inspection.description}"], project)
    return {"project": project, "source": source_in_project, "tracked": tracked}


def git_identity(project: Path) -> list[str]:
    """`-c user.name/-c user.email` for the first commit when git has no identity configured here."""
    proc = subprocess.run(["git", "config", "user.email"], cwd=project, capture_output=True, text=True, check=False)
    return [] if proc.stdout.strip() else ["-c", "user.name=lensmith init", "-c", "user.email=lensmith@localhost"]


def folder_to_copy(source: Path) -> tuple[Path, str] | None:
    """(folder to copy into data/raw/, the source's path inside it): an image folder itself, or a CSV
    manifest's folder when every path it lists is relative and inside that folder; None = refer in place."""
    if source.is_dir():
        return source, ""
    try:
        paths = pd.read_csv(source, usecols=["path"], dtype=str)["path"].dropna()
    except (ValueError, OSError):
        return None
    inside = all(not Path(p).is_absolute() and ".." not in Path(p).parts for p in paths)
    return (source.parent, source.name) if inside else None


def params_yaml_text(plan: InitPlan, params: dict[str, Any]) -> str:
    header = [
        "# Lensmith parameters for " + plan.inspection.description + " (written by lensmith init).",
        "# Chosen for this data:",
        *(f"#   {c.key} = {c.value!r}: {c.why}" for c in plan.choices),
        "# Every key: docs/params.md in the Lensmith checkout, or `lensmith check-params`.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(params, sort_keys=False)
