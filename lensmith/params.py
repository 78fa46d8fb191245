"""params.yaml: the only configuration, validated once at load by pydantic.

A wrong key, type or value raises `ParamsError` (CLI exit code 2) naming the key and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lensmith.errors import ParamsError

DEFAULT_PARAMS_FILE = "params.yaml"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
AUTO = "auto"  # a data-dependent setting resolved from the data (lensmith.resolve)
Auto = Literal["auto"]
ProviderName = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _provider_policy(value: Any) -> Any:
    """One readable error for a bad provider setting (pydantic would report each member of the union)."""
    names = get_args(ProviderName)
    if value == AUTO or (isinstance(value, list) and value and all(isinstance(v, str) and v in names for v in value)):
        return value
    raise PydanticCustomError("provider_policy", "expected 'auto' or a non-empty list of {names} (preference order)", {"names": ", ".join(names)})


# ONNX Runtime providers of a stage: "auto" (CUDA then CPU when onnxruntime offers CUDA, else CPU; never TensorRT)
# or names in preference order (lensmith.onnxmodel.requested_providers)
ProviderPolicy = Annotated[Auto | list[ProviderName], BeforeValidator(_provider_policy)]
PROVIDERS_HELP = (
    "auto = CUDAExecutionProvider then CPU when onnxruntime offers CUDA, else CPU (never TensorRT: its engine builds "
    "take minutes), or a list of TensorrtExecutionProvider / CUDAExecutionProvider / CPUExecutionProvider in "
    "preference order (unavailable ones are skipped, CPU is the last resort)"
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(Section):
    """Where the images come from and what ingest accepts (`lensmith ingest`)."""

    source: str = Field("data/raw/demo", description="Image folder (<class>/<file>), CSV manifest, or s3://bucket/prefix")
    image_extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"],
        description="File types ingest reads (case-insensitive); other files are skipped in a folder, quarantined as "
        "unsupported_extension in a CSV or shard",
    )
    max_pixels: int = Field(40_000_000, gt=0, description="Decompression-bomb limit (width*height)")
    max_file_bytes: int = Field(
        200 * 1024 * 1024, gt=0,
        description="Files larger than this many bytes (default 200 MiB) are quarantined at ingest as file_too_large; raise it for huge scans",
    )
    min_side: int = Field(8, ge=1, description="Images with a side below this are rejected")
    max_aspect_ratio: float = Field(
        20.0, ge=1.0,
        description="Images whose long side / short side exceeds this are quarantined as bad_aspect_ratio; raise it for line-scan strips",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, SeaweedFS) for s3:// sources and projects; "
        "null = AWS, or AWS_ENDPOINT_URL(_S3) from the environment",
    )
    workers: int = Field(0, ge=0, description="Ingest processes; 0 = one per core")
    sources: list[str] = Field(
        default_factory=list,
        description="More sources read together with data.source (folders, CSV manifests, s3:// prefixes); each row records "
        "its source. They are read but not tracked as DVC deps of ingest unless you add them to dvc.yaml's ingest deps",
    )
    reviewed_dir: str = Field(
        "data/reviewed",
        description="The reviewed-data folder `lensmith review import` writes corrected images into (<label>/<sha256>.<ext> "
        "+ metadata.csv); always read with the sources when it exists; must not lie inside data.source or a stage's output",
    )

    @field_validator("image_extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one extension, e.g. ['.jpg', '.png']")
        return sorted({(v if v.startswith(".") else f".{v}").lower() for v in value})

    @model_validator(mode="after")
    def _reviewed_dir_apart(self) -> DataParams:
        reviewed = Path(self.reviewed_dir)
        for name, other in (("data.source", self.source), *(("data.sources", s) for s in self.sources)):
            if other.startswith("s3://") or Path(other).is_absolute() != reviewed.is_absolute():
                continue
            a, b = Path(os.path.normpath(reviewed)), Path(os.path.normpath(other))
            if a.is_relative_to(b) or b.is_relative_to(a):
                raise ValueError(
                    f"reviewed_dir {self.reviewed_dir!r} overlaps {name} {other!r}: corrections are a source of their own "
                    "(a rerun of whatever writes the data must not touch them); use a folder of its own, e.g. data/reviewed"
                )
        return self


class DemoParams(Section):
    """The embedded demo data set (`lensmith demo-data`), generated offline."""

    out: str = Field(
        "data/raw/demo",
        description="Folder the demo set is written to; when data.source names it, the flows run the demo_data stage first",
    )
    per_class: int = Field(
        500, ge=1, le=100_000, description="Demo images per class, spread evenly over sites A and B; lower it for a quicker demo"
    )
    image_size: int = Field(128, ge=32, le=1024, description="Side in pixels of the square demo images")
    seed: int = Field(0, description="Seed of the demo generator: the same seed gives byte-identical images")
    shards: bool = Field(False, description="Write the demo images packed into tar shards (lensmith pack) instead of files")


class ValidateParams(Section):
    """The data gate (`lensmith validate`, Great Expectations)."""

    labels: list[str] | None = Field(None, description="Expected label set; null = discover on first run and pin")
    min_images_per_class: int = Field(
        20, ge=1, description="The gate fails when an expected class has fewer images; lower it only for a first trial on scarce data"
    )
    min_width: int = Field(8, ge=1, description="Narrower images fail the gate (the model resizes every image; 8 px is about the least that carries a shape)")
    min_height: int = Field(8, ge=1, description="Images shorter than this (px) fail the gate")
    max_width: int = Field(8192, ge=1, description="Wider images (px) fail the gate; raise it for high-resolution cameras")
    max_height: int = Field(8192, ge=1, description="Taller images (px) fail the gate; raise it for high-resolution cameras")
    max_pixels: int = Field(
        40_000_000, ge=1,
        description="Images with more pixels (width*height) fail the gate; ingest already quarantines those above data.max_pixels",
    )
    allowed_modes: list[str] = Field(
        default_factory=lambda: ["RGB", "L"],
        description="Colour modes that pass the gate; ingest decodes every file to RGB or L (greyscale), so drop L to reject grey images",
    )
    required_metadata: list[str] | Auto = Field(
        AUTO,
        description="Metadata columns every image must have; auto = the columns data.source declares (metadata.csv / CSV "
        "manifest), required of its rows; rows of data.sources and of the reviewed folder lacking them are a warning",
    )
    max_class_imbalance: float = Field(10.0, ge=1.0, description="largest class count / smallest class count")
    brightness_range: tuple[float, float] = Field(
        (0.0, 255.0), description="Mean grey level bounds; the default accepts dark and bright images alike"
    )
    min_contrast: float = Field(
        0.5, ge=0.0, description="Images whose grey-level standard deviation is below this are blank (one flat colour)"
    )
    min_sharpness: float = Field(
        0.0, ge=0.0, description="Images whose sharpness (variance of the Laplacian) is below this fail the gate, e.g. out of focus; 0 = off"
    )
    near_duplicate_distance: int = Field(4, ge=0, le=64, description="phash Hamming distance for near-duplicates")
    fail_on_near_duplicates: bool = Field(
        False, description="Near-duplicates of other files fail the gate instead of only warning (the split keeps them together either way)"
    )
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0, description="quarantined share of files above which ingest fails")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ValidateParams:
        lo, hi = self.brightness_range
        if not 0 <= lo < hi <= 255:
            raise ValueError("brightness_range must be [low, high] with 0 <= low < high <= 255")
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("min_width/min_height must not exceed max_width/max_height")
        return self


class SplitParams(Section):
    """The stratified, group-aware, stable train/val/test split (`lensmith split`)."""

    train: float = Field(
        0.70, gt=0.0, lt=1.0, description="Target share of each class's images in the training split; train + val + test must be 1"
    )
    val: float = Field(
        0.15, ge=0.0, lt=1.0, description="Target share in the validation split (picks the best epoch, early stopping); training needs it non-empty"
    )
    test: float = Field(
        0.15, gt=0.0, lt=1.0,
        description="Target share in the test split that evaluation and the gates score; changes apply only to images "
        "not yet split (delete data/splits to re-split)",
    )
    group_column: str | None = Field(
        AUTO,
        description="Metadata column whose groups never straddle splits; auto = a batch/lot column when the source "
        "has one, else none (exact and near-duplicates are always kept together)",
    )
    seed: int = Field(0, description="Seed of the order in which equal-size new groups are assigned; images already in a split never move")
    min_class_size: int = Field(10, ge=1, description="Classes smaller than this cannot be split")
    on_small_class: Literal["error", "warn"] = Field(
        "error", description="Classes below min_class_size: error stops the split; warn puts all their images in train, with a warning"
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1.0 (got {total:.4f})")
        return self


class AugmentParams(Section):
    """Training augmentation on uint8 batches."""

    # Orientation-changing augmentations are opt-in: a mirrored or rotated digit, letter or part can be another
    # class. Tiles, textures and surfaces have no up (the demo turns them on; `lensmith init --orientation free`).
    hflip: bool = Field(False, description="Random horizontal mirror (opt-in: changes text, digits, handed parts)")
    vflip: bool = Field(False, description="Random vertical flip (opt-in: only for data with no up, e.g. tiles, textures)")
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0, description="Random rotation up to this angle (opt-in)")
    crop_scale: tuple[float, float] = Field(
        (0.8, 1.0), description="Random crop area as a share of the image [low, high], aspect 3:4 to 4:3, resized back; [1, 1] = no crop"
    )
    brightness: float = Field(0.2, ge=0.0, le=1.0, description="Random brightness factor in 1 +/- this (0 = off)")
    contrast: float = Field(0.2, ge=0.0, le=1.0, description="Random contrast factor in 1 +/- this (0 = off)")
    saturation: float = Field(0.1, ge=0.0, le=1.0, description="Random saturation factor in 1 +/- this, RGB only (0 = off)")
    hue: float = Field(
        0.0, ge=0.0, le=0.5, description="Random hue shift up to +/- this share of the colour wheel, RGB only (0 = off); keep 0 when colour tells classes apart"
    )
    blur_prob: float = Field(0.1, ge=0.0, le=1.0, description="Share of training images given a random Gaussian blur (sigma 0.1-1.5 px)")
    noise_std: float = Field(
        0.02, ge=0.0, le=1.0, description="Std of added Gaussian pixel noise on the 0..1 scale (0.02 = about 5 grey levels; 0 = off)"
    )
    trivial_augment: bool = Field(
        False, description="Also apply torchvision's TrivialAugmentWide (one random op per image, incl. rotation and shear); opt-in like the flips"
    )

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= hi <= 1:
            raise ValueError("crop_scale must be [low, high] with 0 < low <= high <= 1")
        return value


ModelName = Literal[
    "efficientnet_lite0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
]


class TrainParams(Section):
    """Transfer-learning training (`lensmith train`)."""

    model: ModelName = Field(
        "efficientnet_lite0",
        description="Backbone; efficientnet_lite0's weights ship with lensmith, the others download torchvision's; vit_b_16 needs image_size 224",
    )
    pretrained: bool = Field(
        True, description="Start from ImageNet weights (transfer learning); false trains from scratch, which needs far more images and epochs"
    )
    image_size: int = Field(
        128, ge=16, le=1024,
        description="Model input side in pixels (shorter side resized, centre crop), kept for export and serving; larger = finer detail, slower",
    )
    epochs: int = Field(
        8, ge=1, le=1000, description="Most training epochs (early stopping may end sooner); also the length of the cosine learning-rate schedule"
    )
    batch_size: int = Field(
        64, ge=1, le=4096, description="Training images per optimiser step (shared across processes under DDP); lower it when memory runs out"
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum (train.momentum)")
    lr: float = Field(
        1e-3, gt=0.0, le=10.0, description="Peak learning rate after warmup, then cosine decay to 0; lower it when the loss diverges"
    )
    weight_decay: float = Field(
        1e-4, ge=0.0, description="Weight decay of the weights (not biases or norm layers); raise it against overfitting"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (Nesterov when > 0); used only with optimizer sgd")
    warmup_epochs: int = Field(1, ge=0, description="Epochs of linear learning-rate warmup up to lr, before the cosine decay")
    label_smoothing: float = Field(
        0.1, ge=0.0, lt=1.0, description="Cross-entropy label smoothing (0 = off); tempers over-confident predictions"
    )
    class_weights: Literal["auto", "none"] = Field(
        "auto", description="auto = loss weighted by inverse class frequency, so every class counts equally; none = unweighted loss"
    )
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="Clip the gradient's L2 norm to this before each step; null = no clipping"
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout probability before the new classification head; raise it against overfitting")
    bn_recalibration_images: int = Field(
        1024, ge=0,
        description="After each epoch, BatchNorm statistics are recomputed on this many un-augmented training images "
        "(precise BN; 0 = off): without it, validation lags training on data unlike ImageNet",
    )
    freeze_epochs: int = Field(
        1, ge=0, description="First epochs that train only the new head, backbone frozen; 0 = train everything from the start"
    )
    early_stopping_metric: Literal["val_macro_f1", "val_accuracy", "val_loss"] = Field(
        "val_macro_f1",
        description="Validation metric that picks the best epoch (the weights kept) and drives early stopping; "
        "ties (common on a small validation split) go to the epoch with the lower validation loss",
    )
    early_stopping_patience: int = Field(
        3, ge=1, description="Stop after this many epochs without improvement of early_stopping_metric"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where training runs: auto = CUDA when available, else CPU; cuda fails when no GPU is present"
    )
    amp: bool = Field(True, description="bfloat16 mixed precision on CUDA (faster, less memory); no effect on CPU")
    compile: bool = Field(False, description="torch.compile the model on CUDA (slower start, faster epochs); no effect on CPU")
    channels_last: bool = Field(True, description="Train in the channels-last memory format (a speed setting: faster convolutions on most hardware)")
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    processes: int = Field(
        1, ge=1, le=64,
        description="> 1: `lensmith train` relaunches itself under torchrun with this many DistributedDataParallel "
        "processes on this machine (one per GPU with CUDA; gloo on CPU), also inside `dvc repro` and the flows",
    )
    seed: int = Field(0, description="Seed of weight init, shuffling, augmentation and BatchNorm recalibration, for repeatable runs")
    augment: AugmentParams = Field(default_factory=AugmentParams)

    @model_validator(mode="after")
    def _image_size_fits_the_backbone(self) -> TrainParams:
        problem = image_size_problem(self.model, self.image_size)
        if problem:
            raise ValueError(problem)
        return self


MIN_IMAGE_SIZE = 32  # the CNN backbones downsample by 32
VIT_IMAGE_SIZE = 224  # the position embeddings of vit_b_16 are for 14x14 patches of 16 px


def image_size_problem(model: str, image_size: int) -> str | None:
    """Why `model` cannot take square inputs of `image_size` pixels, or None. Checked when params load
    (exit 2 before anything runs) and again by lensmith.models before a model is built."""
    if model == "vit_b_16" and image_size != VIT_IMAGE_SIZE:
        return (
            f"train.image_size={image_size} cannot be used with vit_b_16: it takes exactly {VIT_IMAGE_SIZE} px "
            "(its position embeddings are fixed); set train.image_size: 224 or choose a CNN backbone"
        )
    if image_size < MIN_IMAGE_SIZE:
        return (
            f"train.image_size={image_size} is too small for {model}: it downsamples by 32, so images below "
            f"{MIN_IMAGE_SIZE} px collapse to an empty feature map; use train.image_size >= {MIN_IMAGE_SIZE} "
            "(smaller source images are upscaled)"
        )
    return None


class RobustnessParams(Section):
    """The robustness suite of the evaluation."""

    perturbations: list[
        Literal["brightness_up", "brightness_down", "glare", "blur", "noise", "rotation", "jpeg"]
    ] = Field(
        default_factory=lambda: ["brightness_up", "brightness_down", "glare", "blur", "noise", "rotation", "jpeg"],
        description="Deployment conditions simulated on the test images; drop those your camera setup cannot produce",
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 3, 5],
        description="Severities, 1 (mild) to 5 (harsh), run per perturbation; their mean relative accuracy drop is gated",
    )
    fgsm_epsilon: float | None = Field(
        None, ge=0.0, le=1.0, description="FGSM step in pixel units on the 0..1 scale (8/255 = 8 grey levels); null = skip"
    )
    seed: int = Field(0, description="Seed of the perturbations' randomness (noise, glare position, rotation direction)")

    @field_validator("severities")
    @classmethod
    def _severities_in_range(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= s <= 5 for s in value):
            raise ValueError("severities must be a non-empty list of integers between 1 and 5")
        return value


class OperatingPointParams(Section):
    """The decision threshold on the defect score (1 - P(negative class)), chosen on the validation split with the
    model that is served; used by the reports, the gate and the service's `decision`."""

    target: Literal["min_recall", "max_false_alarm_rate", "min_cost", "argmax"] = Field(
        "min_recall",
        description="What the threshold meets on validation: min_recall (the highest threshold catching that share of "
        "defects), max_false_alarm_rate (the lowest threshold flagging at most that share of good parts), min_cost "
        "(least cost_ratio x missed + false alarms), argmax (no threshold: the most probable class decides)",
    )
    min_recall: float | None = Field(
        0.98, ge=0.0, le=1.0,
        description="Share of defects to catch (target min_recall); with another target, a limit that must hold too (null = none)",
    )
    max_false_alarm_rate: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Share of good parts that may be flagged (target max_false_alarm_rate); with another target, a limit "
        "that must hold too (null = none)",
    )
    cost_ratio: float = Field(
        10.0, gt=0.0, description="A missed defect costs this many false alarms (target min_cost, and the expected cost in reports)"
    )
    review_rate: float = Field(
        0.0, ge=0.0, le=0.5,
        description="Share of validation images whose score is closest to the threshold that go to a human (decision "
        "`review`) instead of being decided; 0 = no review band",
    )
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Sets without a negative class (argmax decides): predictions below this confidence get decision "
        "`review`; null = none",
    )

    @model_validator(mode="after")
    def _target_has_its_value(self) -> OperatingPointParams:
        needed = {"min_recall": self.min_recall, "max_false_alarm_rate": self.max_false_alarm_rate}
        if self.target in needed and needed[self.target] is None:
            raise ValueError(f"target {self.target} needs {self.target} to be set")
        return self


class EvaluateParams(Section):
    """Test-split evaluation (`lensmith evaluate`)."""

    positive_class: str | None = Field(None, description="Class treated as positive; null = any class but negative_class")
    negative_class: str | None = Field(
        AUTO,
        description="The 'good' class for any-defect-vs-ok metrics; auto = a label named ok/good/normal/pass/... when "
        "there is one, else no defect view (multi-class metrics only); null = no defect view",
    )
    slices: list[str] | Auto = Field(
        AUTO, description="Metadata columns reported per value; auto = the declared metadata columns except the group column"
    )
    top_k: int = Field(3, ge=1, description="k of the top-k accuracy in reports/metrics.json (capped at the number of classes)")
    ece_bins: int = Field(15, ge=2, le=100, description="Confidence bins of the expected calibration error and the reliability diagram")
    batch_size: int = Field(
        128, ge=1, description="Images per forward pass for the test, robustness and speed measurements; lower it when memory runs out"
    )
    worst_examples: int = Field(24, ge=0, le=200, description="Most confident mistakes shown in reports/evaluation.html (0 = none)")
    providers: ProviderPolicy = Field(
        AUTO,
        description="ONNX Runtime providers that evaluate the served model (and rescore production for the gate): "
        + PROVIDERS_HELP + "; on a GPU provider the fp32 graph runs, in full float32 (no TF32), and the FGSM attack "
        "runs on CUDA when torch sees one. reports/metrics.json served.provider records the one that ran",
    )
    robustness: RobustnessParams = Field(default_factory=RobustnessParams)
    operating_point: OperatingPointParams = Field(default_factory=OperatingPointParams)


class OrchestrationParams(Section):
    """How the Prefect flow runs the stages."""

    executor: Literal["dvc", "dvc-subprocess", "direct"] = Field(
        "dvc",
        description=(
            "dvc: DVC decides which stages are stale and records dvc.lock, the stage functions run in the flow's "
            "process (one interpreter and one torch import for the whole run); dvc-subprocess: each flow task runs "
            "`dvc repro --single-item STAGE` (stage_timeout_s enforced); direct: stage functions in-process, no DVC"
        ),
    )
    io_retries: int = Field(2, ge=0, le=10, description="Retries for I/O-bound stages (ingest, push/pull)")
    retry_delay_s: float = Field(
        5.0, ge=0.0, description="Seconds before the first retry of an I/O stage; each further retry waits twice as long"
    )
    stage_timeout_s: float = Field(4 * 3600.0, gt=0.0, description="Kill a `dvc repro` stage subprocess after this long (executor dvc-subprocess)")
    on_unreachable_server: Literal["error", "ephemeral"] = Field(
        "error", description="When PREFECT_API_URL does not answer: fail clearly, or run on a temporary local server"
    )
    task_runner: Literal["thread", "dask", "ray"] = Field(
        "thread", description="Where flow tasks run: threads here, a Dask cluster (prefect-dask), or Ray (prefect-ray, extra 'ray')"
    )
    thread_max_workers: int | None = Field(None, ge=1, description="thread runner: most concurrent tasks; null = Prefect's default")
    dask_address: str | None = Field(None, description="dask: scheduler of an existing cluster (tcp://host:8786); null = a local cluster")
    dask_n_workers: int = Field(2, ge=1, le=1024, description="dask local cluster: worker processes")
    dask_threads_per_worker: int = Field(1, ge=1, le=256, description="dask local cluster: task threads per worker process")
    artifact_store: str | None = Field(
        None,
        description=(
            "Workers that share no disk with the project: each stage's data deps are uploaded to this fsspec URI "
            "(s3://bucket/prefix), the stage runs on a worker against it, its outs are downloaded back and recorded "
            "in dvc.lock; null = the workers use the project folder itself"
        ),
    )

    @field_validator("artifact_store")
    @classmethod
    def _store_is_a_uri(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a URI: use s3://bucket/prefix (or file:///path for a folder)")
        return value.rstrip("/") if value else value


class NightlyParams(Section):
    """The nightly retraining deployment (`lensmith nightly`, `lensmith schedule`)."""

    cron: str = Field("0 2 * * *", description="When the nightly retraining deployment runs")
    timezone: str = Field("UTC", description="IANA timezone of the cron schedule, e.g. Europe/Berlin")
    deployment_name: str = Field(
        "nightly-retraining", description="Prefect deployment name of nightly retraining; drift monitoring starts retraining by this name"
    )
    push: bool = Field(True, description="dvc push data and models to the default remote after a run")
    git_commit: bool = Field(True, description="record each run as a git commit + tag (dvc.lock, params, metrics)")
    tag_prefix: str = Field(
        "nightly-", description="Git tag of each recorded run: this prefix + its UTC time (YYYYmmdd-HHMMSS), when git_commit is on"
    )

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(value, datetime(2000, 1, 1))
        except CronSimError:
            raise ValueError(f"{value!r} is not a valid cron expression (e.g. '0 2 * * *')") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known IANA timezone (e.g. 'UTC', 'Europe/Berlin')") from None
        return value


class GateParams(Section):
    """The champion/challenger gate and absolute floors (`lensmith gate`)."""

    metric: str = Field("test.macro_f1", description="Dotted metrics.json key the challenger must improve on")
    min_improvement: float = Field(0.0, ge=0.0, le=1.0, description="challenger >= champion + this on gate.metric")
    max_regression: float = Field(0.02, ge=0.0, le=1.0, description="largest allowed drop of any class recall / slice accuracy")
    min_accuracy: float = Field(0.80, ge=0.0, le=1.0, description="Floor on test accuracy: a model below it is rejected, whatever production scores")
    min_macro_f1: float = Field(
        0.75, ge=0.0, le=1.0, description="Floor on test macro F1 (every class weighs the same): a model below it is rejected"
    )
    min_positive_recall: float = Field(0.80, ge=0.0, le=1.0, description="Recall floor of the positive (defect) class")
    max_ece: float = Field(0.10, ge=0.0, le=1.0, description="Expected calibration error ceiling")
    max_robustness_drop: float = Field(0.25, ge=0.0, le=1.0, description="Ceiling of robustness.mean_relative_drop")
    min_slice_accuracy: float = Field(0.70, ge=0.0, le=1.0, description="No slice value may score below this")
    min_slice_n: int = Field(10, ge=1, description="Slices with fewer test images are reported but not gated")
    int8_max_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="int8 accuracy drop limit when int8 is served; null = the limit in reports/export.json"
    )
    require_same_test_split: bool = Field(
        False,
        description="Reject when production could not be re-scored on today's test split and its stored metrics come "
        "from another one",
    )
    min_false_negative_reduction: float = Field(
        0.0, ge=-1.0, le=1.0,
        description="The candidate's missed-defect rate must be at most production's x (1 - this), each at its own "
        "operating point on today's test split (0.3 = miss 30% fewer; 0 = no more; negative = may miss more)",
    )
    max_false_positive_increase: float = Field(
        0.05, ge=0.0,
        description="The candidate's false-alarm rate may be at most production's x (1 + this), each at its own "
        "operating point (relative: production with no false alarms allows none)",
    )
    min_images_per_s: float | None = Field(
        None, gt=0.0, description="Throughput floor of the served model at evaluate.batch_size (ONNX Runtime, this machine); null = none"
    )
    max_latency_ms: float | None = Field(
        None, gt=0.0, description="Ceiling of the served model's batch-1 p95 latency in ms (one unit at a time); null = none"
    )


class ExportParams(Section):
    """ONNX export, parity and int8 gates (`lensmith export`)."""

    opset: int = Field(18, ge=17, le=23, description="ONNX opset for the dynamo exporter")
    parity_max_abs_diff: float = Field(
        1e-4, gt=0.0, description="Parity gate: max |logit(ONNX) - logit(PyTorch)| on the test split is at most this + parity_rtol x the largest |logit|"
    )
    parity_rtol: float = Field(
        1e-3, ge=0.0, le=0.1,
        description="Relative part of the parity tolerance: float32 rounding grows with the logits' size and the BatchNorm scales",
    )
    parity_min_top1_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="Least share of parity images on which ONNX and PyTorch pick the same top class; below it the export fails"
    )
    parity_max_images: int = Field(0, ge=0, description="Test images used by the parity gate; 0 = all")
    int8: bool = Field(True, description="Try static int8 quantisation (QDQ, per-channel), gated by accuracy")
    int8_max_drop: float = Field(0.01, ge=0.0, le=1.0, description="Allowed test-accuracy drop of int8 vs fp32 (0.01 = 1 point)")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="How int8 calibration sets activation ranges (ONNX Runtime); try another when int8 fails its accuracy limit"
    )
    calibration_images: int = Field(256, ge=1, description="Training images used to calibrate int8")
    parity_providers: ProviderPolicy = Field(
        AUTO,
        description="ONNX Runtime providers of the parity gate's model.onnx run: " + PROVIDERS_HELP + "; full float32 "
        "on CUDA (no TF32). model.opt.onnx (a CPU graph), int8 calibration and accuracy and the speed comparison stay on "
        "the CPU. export.json parity.provider records the one that ran",
    )
    providers: list[ProviderName] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], description="Preference order; unavailable ones are skipped"
    )
    bench_seconds: float = Field(1.5, gt=0.0, description="Time spent measuring each latency figure")
    seed: int = Field(0, description="Seed choosing the parity and int8 calibration images when parity_max_images / calibration_images cap them")
    tensorrt: bool = Field(
        False,
        description="Also build a TensorRT plan (model.plan) from model.onnx with the `tensorrt` package on a CUDA GPU: fp16 and its batch "
        "profile 1..max_batch_size from serve.tensorrt_fp16 / serve.max_batch_size, gated by the parity check; `lensmith export "
        "--tensorrt` turns it on for one run",
    )
    tensorrt_fp16_max_abs_diff: float = Field(
        0.01, gt=0.0,
        description="Parity gate of an fp16 TensorRT plan: max |logit(plan) - logit(PyTorch)| is at most this + tensorrt_fp16_rtol x the "
        "largest |logit| (fp16 rounding is far above the fp32 bound; an fp32 plan keeps parity_max_abs_diff/parity_rtol; unmeasured on a GPU)",
    )
    tensorrt_fp16_rtol: float = Field(
        0.01, ge=0.0, le=0.5, description="Relative part of an fp16 TensorRT plan's parity tolerance (see tensorrt_fp16_max_abs_diff)"
    )


class ServeParams(Section):
    """The prediction service (`lensmith serve`)."""

    host: str = Field(
        "127.0.0.1", description="Interface the service binds: 127.0.0.1 = this machine only, 0.0.0.0 = every interface; --host overrides"
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the service; --port overrides")
    providers: list[ProviderName] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime providers in preference order; unavailable ones are skipped, CPU is the last resort",
    )
    variant: Literal["auto", "fp32", "int8"] = Field("auto", description="auto = what the export chose for this CPU")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Micro-batching: most images per session run")
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="Micro-batching: longest wait for a batch to fill")
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Per-request body limit")
    max_images_per_request: int = Field(
        16, ge=1, le=1024, description="Requests with more images are refused (400 too_many_images)"
    )
    max_pixels: int = Field(
        25_000_000, gt=0,
        description="Uploads with more pixels (width*height) are refused from their header, before decoding (413 too_large); "
        "serving's own limit, apart from data.max_pixels and validate.max_pixels",
    )
    max_request_pixels: int = Field(
        100_000_000, gt=0, description="Pixels (width*height, from the headers) of all a request's images together; more is refused before decoding (413 too_large)"
    )
    max_concurrent_decodes: int = Field(
        0, ge=0, le=256, description="Uploads decoded at once (requests wait their turn, within serve.request_timeout_s); 0 = one per core"
    )
    top_k: int = Field(3, ge=1, description="Classes returned per prediction, most probable first (capped at the number of classes)")
    review_threshold: float = Field(0.6, ge=0.0, le=1.0, description="Predictions below this confidence go to review")
    require_token_for_predict: bool = Field(False, description="Also demand the bearer token on /v1/predict")
    reload_poll_s: float = Field(2.0, gt=0.0, description="How often the registry's aliases are checked for a new model")
    reload_backoff_max_s: float = Field(
        300.0, gt=0.0, description="A model that failed to load or warm up is retried after reload_poll_s, doubling up to this many seconds"
    )
    log_dir: str = Field("serving/predictions", description="Rotating append-only prediction log (relative to root)")
    log_rotate_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Size in bytes at which the prediction log starts a new file (default 16 MiB)"
    )
    log_max_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Most bytes of prediction log kept: the least recently written files are deleted beyond it "
        "(never the file being written; keep it a few times log_rotate_bytes); 0 = no size limit (default 1 GiB)",
    )
    log_max_age_days: float = Field(
        90.0, ge=0.0,
        description="Prediction log files last written longer ago are deleted; keep it longer than drift.since, "
        "whose window drift monitoring reads from the log; 0 = kept forever",
    )
    log_max_backlog: int = Field(
        20_000, ge=1,
        description="Most prediction records held in memory while the log cannot be written (disk full); newer "
        "ones are dropped and counted (lensmith_prediction_log_dropped_records_total), predictions are still answered",
    )
    review_dir: str = Field("serving/review", description="Review queue on disk (relative to root)")
    review_max_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Most bytes the review queue keeps (its queue.jsonl and images): the oldest items are removed "
        "beyond it; feedback items with a human label are kept until `review import` took them in; 0 = no size limit (default 1 GiB)",
    )
    review_max_age_days: float = Field(
        30.0, ge=0.0,
        description="Review items older than this are removed (feedback items with a human label only after "
        "`review import` took them in): export, label and import more often than this; 0 = kept forever",
    )
    feedback_window: int = Field(
        4096, ge=1,
        description="Recent predictions kept in memory for /v1/feedback (forgotten on restart); feedback on an older "
        "prediction is answered 404 naming its review item when it has one",
    )
    max_context_fields: int = Field(
        16, ge=0, le=256,
        description="Context fields (the model's metadata columns: site, line, camera...) one predict request may carry, "
        "as multipart fields or X-Lensmith-Context-<column> headers; more are refused (422)",
    )
    max_context_value_chars: int = Field(
        128, ge=1, le=4096, description="Longest context value accepted (printable characters only); longer is refused (422)"
    )
    live_window: int = Field(
        500, ge=1,
        description="Corrections of served decisions behind the live defect recall / false-alarm rate gauges (the last N)",
    )
    access_log: bool = Field(
        False,
        description="uvicorn's access log line for every request; off, 4xx/5xx answers are still logged one line each "
        "(the prediction log records every prediction either way)",
    )
    threads: int = Field(
        0, ge=0,
        description="ONNX Runtime intra-op threads per session run; on CPU, cores // threads batches run at once. "
        "0 = single-threaded runs, one per core plus one (the fastest layout measured: bench/serve.py)",
    )
    runners: int = Field(
        0, ge=0, le=256,
        description="Session runs at once; 0 = automatic (threads 0 on CPU: cores + 1; threads N: cores // N; GPU: 1)",
    )
    tensorrt_fp16: bool = Field(
        False,
        description="With TensorrtExecutionProvider in providers: build the engine with fp16 kernels (check accuracy "
        "with bench/inference.py); its batch profile is 1..max_batch_size, its cache under $LENSMITH_TENSORRT_CACHE",
    )
    runner_nice: int = Field(
        10, ge=0, le=19,
        description="How much lower the CPU priority of the inference threads is than the event loop's (Linux nice "
        "steps; 0 = the same): under overload the loop that admits and answers requests is not kept waiting behind the runs",
    )
    max_queue: int = Field(
        32, ge=1,
        description="Predict requests queued (decoding, or waiting for a decode slot or a session run); more are answered "
        "503 overloaded with Retry-After. Queueing adds about max_queue / throughput to the latency",
    )
    max_queue_wait_ms: float = Field(
        0.0, ge=0.0,
        description="Predict requests that would wait longer than this for inference (images queued and being run x the "
        "measured seconds per image / runners) are answered 503 overloaded with Retry-After; 0 = auto, 6x the measured "
        "seconds per image: 6 images per runner ahead (max_queue still caps the count)",
    )
    overload_queue_wait_ms: float = Field(
        0.0, ge=0.0,
        description="While overloaded (see overload_hold_s) the longest expected wait a predict request is admitted with; "
        "0 = auto, 0.5x the measured seconds per image: about one image ahead per two runners, so an accepted request "
        "mostly goes straight to a runner (with one runner, e.g. a GPU, auto keeps max_queue_wait_ms: batches make it fast)",
    )
    overload_hold_s: float = Field(
        2.0, ge=0.0,
        description="Seconds overload mode lasts after max_queue_wait_ms (or max_queue) last refused a request, or after "
        "a refusal while more than a fifth of the requests are refused: under sustained overload a deep queue only adds "
        "latency, so the accepted ones get a short one; 0 = never",
    )
    request_timeout_s: float = Field(
        10.0, gt=0.0, description="Deadline of a predict request from its arrival; past it the answer is 503 with Retry-After (408 while the body is still arriving)"
    )
    max_connections: int = Field(
        256, ge=1, description="uvicorn's limit_concurrency (open connections and requests) and listen backlog; beyond it uvicorn answers 503"
    )
    keep_alive_s: float = Field(5.0, gt=0.0, description="Seconds uvicorn keeps an idle keep-alive connection open")


class FinetuneParams(Section):
    """Per-site fine-tuning (`lensmith finetune`)."""

    epochs: int = Field(3, ge=1, le=100, description="Fine-tuning epochs on the site's images")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Low learning rate: adapt, do not forget")
    max_images: int = Field(200, ge=4, description="Most site images used (the rest of the site set tests)")
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of the site's images kept to evaluate on the site")
    site_column: str = Field("site", description="Manifest/metadata column naming the site")
    freeze_backbone: bool = Field(False, description="Train only the classifier head")
    seed: int = Field(0, description="Seed of the site's fine-tune/test split and of fine-tuning's shuffling and augmentation")


class DriftParams(Section):
    """Drift monitoring (`lensmith drift`, the monitoring deployment)."""

    embedding_dims: int = Field(16, ge=1, le=256, description="PCA components of the penultimate-layer embeddings")
    share_threshold: float = Field(0.6, gt=0.0, le=1.0, description="Retrain when this share of monitored columns drifts, for a reference without a calibration (no validation batches) at its window size and slice")
    confidence_drop: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Retrain when a slice's mean confidence drops this much (relative) or more: a floor under the drop "
        "threshold calibrated with the share on held-out windows, the threshold itself for a reference without that calibration",
    )
    p_value: float = Field(0.05, gt=0.0, lt=1.0, description="Per-column significance of the KS / chi-square tests")
    min_window: int = Field(30, ge=1, description="Windows with fewer images are reported but never trigger")
    max_reference_rows: int = Field(5000, ge=100, description="Reference rows kept (seeded sample of the train split)")
    model: str = Field("production", description="Registry alias/version whose reference is compared, or 'candidate'")
    since: str = Field("7d", description="Prediction-log window when --current is the log, e.g. 12h, 7d, 2w")
    current: str | None = Field(None, description="What the monitoring flow checks: folder, s3:// prefix; null = the prediction log")
    batch_size: int = Field(
        64, ge=1, le=4096,
        description="Images per ONNX Runtime run for embeddings (on a GPU provider at least 256: one session, larger batches)",
    )
    providers: ProviderPolicy = Field(
        AUTO,
        description="ONNX Runtime providers of the drift embeddings (reference and windows): " + PROVIDERS_HELP + "; "
        "full float32 on CUDA (no TF32). On CPU, single-threaded runs side by side; on a GPU, one session runs the "
        "batches in turn. The reference JSON and the drift report record the one that ran",
    )
    max_window_images: int = Field(
        1000, ge=10,
        description="Larger windows are measured on a seeded random sample of this many images: "
        "bounded time, and the same test sensitivity whatever the window size",
    )
    cron: str = Field("0 6 * * *", description="When the monitoring deployment runs")
    timezone: str = Field("UTC", description="IANA timezone of the monitoring cron")
    deployment_name: str = Field("drift-monitoring", description="Prefect deployment name of the drift monitoring flow")
    webhook_url_env: str | None = Field(
        "LENSMITH_DRIFT_WEBHOOK_URL",
        description="Environment variable holding the URL that receives a JSON alert on trigger (a secret: never in "
        "params.yaml; unset or empty variable = no webhook); null = no webhook",
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0.0, description="Seconds to wait for the webhook; a failed call is logged, the alert and the retraining run stand"
    )
    seed: int = Field(0, description="Seed of the reference sample, the embedding PCA and the window sample, for repeatable drift reports")
    where: list[str] = Field(
        default_factory=list,
        description="Filters of the current window, each `column=value` or `column=v1,v2` (all must hold): the prediction "
        "log's context, a folder's metadata.csv column; `lensmith drift --where` overrides",
    )
    slice_by: list[str] | Auto = Field(
        AUTO,
        description="Context columns (metadata.csv, the prediction log's context) whose values are compared with the "
        "matching slice of the reference; auto = the metadata columns every production batch holds one value of "
        "(site, line), none without a batch column; [] = the whole reference",
    )
    min_slice_rows: int = Field(
        100, ge=1, description="Reference training rows a slice needs to be compared on its own; a smaller one is reported as too small"
    )
    min_effect: float = Field(
        0.1, ge=0.0, le=1.0,
        description="A column drifts when its p-value is below drift.p_value and its KS distance is at least this: "
        "large windows do not flag trivial differences",
    )
    false_alarm_rate: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="Target false-alarm rate per window; the share threshold is calibrated to it on held-out reference "
        "windows (validation batches, resampled) at the window's size",
    )
    calibration_windows: int = Field(
        100, ge=0, le=10000, description="Resampled held-out windows per slice and size that calibrate the share threshold; 0 = none"
    )
    calibration_sizes: list[int] = Field(
        default_factory=lambda: [100, 300, 1000],
        description="Window sizes the reference is calibrated at (a window uses the nearest; larger ones are sampled "
        "to drift.max_window_images)",
    )
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)

    @model_validator(mode="before")
    @classmethod
    def _webhook_url_not_in_params(cls, data: Any) -> Any:
        """The webhook URL is a secret: never a value here (it would land in meta.json and the reports).
        The errors never echo the value: it may be that secret."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "webhook_url" in data and data.pop("webhook_url") is not None:
            raise ValueError(
                "drift.webhook_url is no longer read from params.yaml (the URL is a secret): put it in the environment "
                "variable named by drift.webhook_url_env (default LENSMITH_DRIFT_WEBHOOK_URL) and delete the key"
            )
        name = data.get("webhook_url_env")
        if name is not None and not (isinstance(name, str) and ENV_NAME.fullmatch(name)):
            raise ValueError("drift.webhook_url_env must name an environment variable (letters, digits, _), not hold the URL")
        return data

    @field_validator("where")
    @classmethod
    def _where_is_column_equals_values(cls, value: list[str]) -> list[str]:
        for item in value:
            column, equals, values = item.partition("=")
            if not equals or not column.strip() or not all(v.strip() for v in values.split(",")):
                raise ValueError(f"{item!r} is not a filter like site=C or site=C,D (column=value[,value...])")
        return value

    @field_validator("since")
    @classmethod
    def _since_is_duration(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"\d+[smhdw]", value.strip()):
            raise ValueError(f"{value!r} is not a duration like 30m, 12h, 7d or 2w")
        return value.strip()

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, value: str) -> str:
        return NightlyParams._cron_is_valid(value)

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        return NightlyParams._timezone_is_known(value)


with warnings.catch_warnings():
    # `validate` is the stage's name; shadowing pydantic's deprecated BaseModel.validate is harmless.
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Params(Section):
        data: DataParams = Field(default_factory=DataParams)
        demo: DemoParams = Field(default_factory=DemoParams)
        validate: ValidateParams = Field(default_factory=ValidateParams)  # type: ignore[assignment]
        split: SplitParams = Field(default_factory=SplitParams)
        train: TrainParams = Field(default_factory=TrainParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)
        nightly: NightlyParams = Field(default_factory=NightlyParams)
        export: ExportParams = Field(default_factory=ExportParams)
        serve: ServeParams = Field(default_factory=ServeParams)
        gate: GateParams = Field(default_factory=GateParams)
        drift: DriftParams = Field(default_factory=DriftParams)


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem, each naming the dotted key and what is allowed."""
    lines = [f"invalid parameters in {origin}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(_allowed_keys(item['loc']))}")
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.01` -> (["train", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ParamsError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key=value` override applied (nested dicts created as needed)."""
    merged = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ParamsError(f"--set {'.'.join(parts)}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def read_params_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def params_from_dict(raw: dict[str, Any], origin: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, origin)) from None


def load_params(path: Path | str = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Load params.yaml (missing file = all defaults), apply `--set` overrides, validate."""
    path = Path(path)
    raw = apply_overrides(read_params_yaml(path), overrides or [])
    origin = str(path) + (" with --set overrides" if overrides else "")
    return params_from_dict(raw, origin)
