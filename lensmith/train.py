"""`lensmith train`: transfer learning from data/splits into models/candidate/.

Shaped like torchvision's references/classification: load_data, train_one_epoch, evaluate, plain-dict
checkpoints, and run_train as main. Images are decoded once into a uint8 cache (lensmith.datacache);
epochs read batches from it ahead of the step (lensmith.batches: pinned memory for a GPU), move them to
the device as uint8 and augment them there (lensmith.augment). One code path for CPU and CUDA: on a GPU
the host only queues work (loss and accuracy are summed on the device and read every few steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm import tqdm

import lensmith
from lensmith import distributed as ddp
from lensmith.augment import augment_batch
from lensmith.batches import prefetched
from lensmith.errors import DataError, LensmithError
from lensmith.fsutil import file_sha256, write_bytes_atomic
from lensmith.layout import SPLIT_NAMES, Layout
from lensmith.modelio import portable_state_dict, save_trained, state_dict_sha256
from lensmith.models import build_model, preprocessing_for, set_backbone_trainable
from lensmith.params import Params, TrainParams
from lensmith.preprocess import Preprocessing
from lensmith.resolve import resolve
from lensmith.split import read_split_frame
from lensmith.splitdata import SplitData, load_split_data

CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "training_curves.png"
CHECKPOINT_FORMAT = 1
# On a GPU, reading the loss stalls the host until the device catches up: the loss is checked for NaN/inf
# (and the progress bar updated) every this many steps instead of every step. On the CPU, every step.
GPU_CHECK_STEPS = 25
# torch.compile runs on CUDA only (Inductor's CPU code needs a C++ toolchain and rarely pays on small CPUs);
# tests set a backend here ("eager", "aot_eager") to exercise the compiled path's guards on the CPU.
COMPILE_CPU_BACKEND: str | None = None


class TrainingError(LensmithError):
    """Training cannot start or continue (diverged loss, unusable checkpoint...)."""


class CheckpointError(TrainingError):
    """`--resume` found no usable checkpoint."""


# ---------------------------------------------------------------------------------------------- data


def read_split(layout: Layout, name: str) -> pd.DataFrame:
    return read_split_frame(layout, name, needed_for="training needs images in train and val")


def class_names(train: pd.DataFrame) -> list[str]:
    classes = sorted(train["label"].astype(str).unique())
    if len(classes) < 2:
        raise DataError(
            f"the train split holds a single class ({classes[0]!r}); a classifier needs at least 2 labelled classes"
        )
    return classes


def data_hash(layout: Layout) -> dict[str, str]:
    """sha256 of the manifest and every split file (what the model was trained from), plus a combined one."""
    hashes = {}
    for path in [layout.manifest, *(layout.split_file(n) for n in SPLIT_NAMES)]:
        if path.is_file():
            hashes[str(path.relative_to(layout.root))] = file_sha256(path)
    combined = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
    return {"combined": combined, **hashes}


def batch_order(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> list[torch.Tensor]:
    """Shuffled index batches; a last batch of one image is dropped (BatchNorm cannot train on it), and
    with `drop_last` any short last batch (a compiled model would compile again for its shape)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and (len(batches[-1]) == 1 or (drop_last and len(batches[-1]) < batch_size)):
        batches.pop()
    return batches


# ------------------------------------------------------------------------------------- optimisation


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """'auto': N / (K * n_c), so every class contributes equally to the loss; 'none': None."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def build_optimizer(model: nn.Module, tp: TrainParams, device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, nesterov=tp.momentum > 0)
    # fused: one kernel per step for every parameter on CUDA instead of a few per tensor
    return torch.optim.AdamW(groups, lr=tp.lr, fused=device.type == "cuda")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, tp: TrainParams, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = tp.warmup_epochs * steps_per_epoch
    total = tp.epochs * steps_per_epoch

    def multiplier(step: int) -> float:
        return warmup_cosine(step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def configure_cuda() -> None:
    """Fixed input shapes: let cuDNN pick the fastest convolution per shape; TF32 for what runs in float32."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def compiles(tp: TrainParams, device: torch.device) -> bool:
    return tp.compile and (device.type == "cuda" or COMPILE_CPU_BACKEND is not None)


def compile_model(model: nn.Module, device: torch.device, cache_dir: Path) -> nn.Module:
    """torch.compile'd `model`. Its graph is compiled once, at the first step, and reused by every later
    epoch: training steps keep one shape (short last batches are dropped) and one set of trainable
    parameters (compiling starts after the frozen-backbone epochs), so nothing triggers a recompile.
    Inductor's compiled kernels are cached under the project's .cache/ across runs."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "torchinductor"))
    backend = "inductor" if device.type == "cuda" else COMPILE_CPU_BACKEND
    return torch.compile(model, backend=backend)


# ------------------------------------------------------------------------------------ epoch loops


@dataclass
class EpochContext:
    model: nn.Module  # what runs forward (possibly torch.compile'd)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    preprocessing: Preprocessing
    tp: TrainParams
    dist: ddp.DistContext = ddp.SINGLE_PROCESS  # under torchrun: this rank's shard of every batch

    @property
    def autocast(self) -> torch.autocast:
        enabled = self.device.type == "cuda" and self.tp.amp
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def check_steps(self) -> int:
        return 1 if self.device.type == "cpu" else GPU_CHECK_STEPS

    @property
    def pinned(self) -> bool:
        return self.device.type == "cuda"

    @property
    def drop_last(self) -> bool:
        return compiles(self.tp, self.device)


def model_input(batch: torch.Tensor, ctx: EpochContext) -> torch.Tensor:
    """float 0..255 (or uint8) N x C x H x W -> normalised, on the device, in the training memory format."""
    x = ctx.preprocessing.normalize_tensor(batch.to(ctx.device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if ctx.tp.channels_last else x


def nonfinite_loss_error(loss: float, epoch: int, steps: tuple[int, int], lr: float) -> TrainingError:
    where = f"step {steps[1]}" if steps[0] == steps[1] else f"one of steps {steps[0]}-{steps[1]}"
    return TrainingError(
        f"the training loss became {loss} at epoch {epoch + 1}, {where} "
        f"(lr {lr:.3g}); training stopped and the last good checkpoint is kept. "
        "Lower train.lr, set train.grad_clip, or check the images for corrupt values"
    )


def train_one_epoch(
    ctx: EpochContext, data: SplitData, shuffle: torch.Generator, augment: torch.Generator, epoch: int
) -> dict[str, float]:
    ctx.model.train()
    batches = ddp.rank_batches(batch_order(len(data.labels), ctx.tp.batch_size, shuffle, ctx.drop_last), ctx.dist)
    # running sums stay on the device: reading them every step would make the host wait for the GPU
    total_loss = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    worst = torch.zeros((), device=ctx.device)  # a non-finite loss since the last check, else 0
    seen, checked = 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{ctx.tp.epochs}", unit="batch", leave=False, disable=None)
    for step, batch in enumerate(prefetched(data.images, data.labels, batches, pin=ctx.pinned)):
        uint8_images, targets = batch.to(ctx.device)
        images = augment_batch(uint8_images, ctx.tp.augment, augment)
        with ctx.autocast:
            logits = ctx.model(model_input(images, ctx))
            loss = ctx.criterion(logits.float(), targets)
        detached = loss.detach()
        worst = torch.where(torch.isfinite(detached), worst, detached)
        if (step + 1) % ctx.check_steps == 0 or step + 1 == len(batches):
            if not torch.isfinite(worst):  # before the step: on the CPU no update is made from a bad loss
                raise nonfinite_loss_error(worst.item(), epoch, (checked + 1, step + 1), ctx.scheduler.get_last_lr()[0])
            checked = step + 1
            if seen:
                bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}", refresh=False)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        if ctx.tp.grad_clip is not None:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_([p for p in ctx.model.parameters() if p.grad is not None], ctx.tp.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        ctx.scheduler.step()
        total_loss += detached * len(batch.index)
        correct += (logits.detach().argmax(1) == targets).sum()
        seen += len(batch.index)
        bar.update()
    bar.close()
    mean_loss, right = total_loss.item() / max(seen, 1), int(correct.item())  # waits for the device's last step
    seconds = time.perf_counter() - start
    return {
        "train_loss": mean_loss,
        "train_accuracy": right / max(seen, 1),
        "train_images_per_second": seen / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


@torch.no_grad()
def recalibrate_batchnorm(ctx: EpochContext, model: nn.Module, images: np.ndarray, limit: int, seed: int) -> int:
    """Re-estimate every BatchNorm layer's running statistics on un-augmented training images (precise BN).

    During training the running statistics follow augmented batches (noise, blur, colour jitter), and a
    backbone ported from TensorFlow (EfficientNet-Lite0: momentum 0.01) follows them only slowly; both make
    evaluation-mode predictions lag what the weights can do, by 20-50 points on data far from ImageNet.
    Recomputing the statistics as an exact average over clean images after each epoch removes both causes.
    The same seeded subset every epoch and on every rank keeps runs deterministic. Returns images used.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if limit <= 0 or not layers or len(images) == 0:
        return 0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 3))[:limit]
    chosen = np.sort(order.numpy())
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None = cumulative average over every batch seen
    model.eval()  # dropout off: recalibrating must not draw from the global RNG that training's dropout uses
    for layer in layers:
        layer.train()
    batch_size = max(ctx.tp.batch_size, 2)
    batches = [b for b in torch.from_numpy(chosen).split(batch_size) if len(b) >= 2]  # BatchNorm needs 2 in training mode
    try:
        for batch in prefetched(images, None, batches, pin=ctx.pinned):
            with ctx.autocast:
                model(model_input(batch.images.to(ctx.device, non_blocking=True), ctx))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return len(chosen)


@torch.inference_mode()
def predict_logits(ctx: EpochContext, images: np.ndarray, batch_size: int) -> torch.Tensor:
    ctx.model.eval()
    outputs = []
    for batch in prefetched(images, None, torch.arange(len(images)).split(batch_size), pin=ctx.pinned):
        with ctx.autocast:
            outputs.append(ctx.model(model_input(batch.images.to(ctx.device, non_blocking=True), ctx)).float())
    return torch.cat(outputs).cpu()


def evaluate(ctx: EpochContext, data: SplitData, num_classes: int) -> dict[str, float]:
    """Validation metrics: unweighted, unsmoothed cross-entropy, accuracy and macro-F1."""
    logits = predict_logits(ctx, data.images, max(ctx.tp.batch_size, 64))
    targets = torch.from_numpy(data.labels)
    predictions = logits.argmax(1).numpy()
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, targets)),
        "val_accuracy": float((predictions == data.labels).mean()),
        "val_macro_f1": float(
            f1_score(data.labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0)
        ),
    }


def is_improvement(metric: str, metrics: dict[str, float], best: dict[str, float]) -> bool:
    """Whether this epoch's validation `metrics` beat the best so far on `metric`.

    Accuracy and macro-F1 move in steps of one image: on a small validation split several epochs tie, and the
    first of them is usually an early, high-learning-rate one. A tie is broken by the lower validation loss.
    """
    if not best:
        return True
    value, best_value = metrics[metric], best[metric]
    if metric == "val_loss":
        return value < best_value
    return value > best_value or (value == best_value and metrics["val_loss"] < best["val_loss"])


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class Progress:
    """Everything about the run's position that is not a module/optimizer state."""

    epoch: int = 0  # epochs completed
    best_metric: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def rng_states(shuffle: torch.Generator, augment: torch.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "augment": augment.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], shuffle: torch.Generator, augment: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    shuffle.set_state(states["shuffle"])
    augment.set_state(states["augment"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}; run `lensmith train` without --resume to start afresh")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"--resume: checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
            "delete it and run `lensmith train` without --resume"
        ) from None
    needed = {"format", "model", "optimizer", "scheduler", "scaler", "rng", "progress", "train_params", "classes"}
    if not isinstance(payload, dict) or not needed <= set(payload):
        raise CheckpointError(f"--resume: {path} is not a lensmith training checkpoint; delete it and train afresh")
    return payload


def checkpoint_payload(
    model: nn.Module, ctx: EpochContext, shuffle: torch.Generator, augment: torch.Generator, progress: Progress,
    params: Params, classes: list[str], data_hashes: dict[str, str],
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": portable_state_dict(model),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "rng": rng_states(shuffle, augment),
        "progress": progress.__dict__,
        "train_params": params.train.model_dump(mode="json"),
        "params": params.model_dump(mode="json"),
        "preprocessing": ctx.preprocessing.to_dict(),
        "classes": classes,
        "data_hash": data_hashes,
    }


def check_resumable(payload: dict[str, Any], params: Params, classes: list[str], data_hashes: dict[str, str]) -> None:
    current = params.train.model_dump(mode="json")
    changed = sorted(k for k in current if payload["train_params"].get(k) != current[k])
    if changed:
        raise CheckpointError(
            f"--resume: train params changed since the checkpoint ({', '.join('train.' + k for k in changed)}); "
            "restore them or train afresh without --resume"
        )
    if payload["classes"] != classes or payload.get("data_hash", {}).get("combined") != data_hashes["combined"]:
        raise CheckpointError("--resume: the splits changed since the checkpoint; train afresh without --resume")


# ---------------------------------------------------------------------------------------- outputs


@dataclass
class TrainSummary:
    model_dir: Path
    arch: str
    epochs_run: int
    best_epoch: int
    metric: str
    best_value: float
    stopped_early: bool
    seconds: float
    images_per_second: float
    weights_sha256: str

    def __str__(self) -> str:
        stop = ", stopped early" if self.stopped_early else ""
        return (
            f"trained {self.arch} for {self.epochs_run} epoch(s){stop} in {self.seconds:.1f}s "
            f"({self.images_per_second:.0f} img/s); best epoch {self.best_epoch}: {self.metric}={self.best_value:.4f}; "
            f"model -> {self.model_dir / 'model.pt'}"
        )


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def epoch_line(epoch: int, epochs: int, m: dict[str, float], best: bool) -> str:
    return (
        f"epoch {epoch}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.3f} | "
        f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.3f} macro-F1 {m['val_macro_f1']:.3f} | "
        f"lr {m['lr']:.2e} {m['train_images_per_second']:.0f} img/s {m['train_seconds']:.1f}s{'  *best' if best else ''}"
    )


def plot_curves(history: list[dict[str, float]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensmith.fsutil import atomic_path

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train accuracy")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_acc.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro-F1")
    ax_acc.set(title="accuracy / F1", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def open_live(layout: Layout, resume: bool) -> Any:
    from dvclive import Live

    # dvcyaml=None / save_dvc_exp=False: dvc.yaml declares the metrics and plots; dvclive must neither
    # rewrite it nor create experiments or git commits on its own (inside `dvc exp run` DVC does that).
    return Live(dir=str(layout.reports / "train"), resume=resume, save_dvc_exp=False, dvcyaml=None)


# ---------------------------------------------------------------------------------------------- main


def run_train(params: Params, layout: Layout, resume: bool = False) -> TrainSummary:
    tp = params.train
    started = time.perf_counter()
    device = resolve_device(tp.device)
    dist_ctx = ddp.init_distributed(device)  # single process unless launched by torchrun
    device = ddp.rank_device(device, dist_ctx)
    torch.set_num_threads(tp.num_threads or ddp.default_threads(dist_ctx))
    if device.type == "cuda":
        configure_cuda()
    preprocessing = preprocessing_for(tp.model, tp.image_size)

    train_frame, val_frame = read_split(layout, "train"), read_split(layout, "val")
    classes = class_names(train_frame)
    hashes = data_hash(layout)
    checkpoint_path = layout.candidate / CHECKPOINT_FILE
    checkpoint = load_checkpoint(checkpoint_path) if resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, params, classes, hashes)

    with ddp.main_first(dist_ctx):  # rank 0 builds the image cache, the others read it
        train_data = load_split_data(layout, train_frame, classes, "train", preprocessing)
        val_data = load_split_data(layout, val_frame, classes, "val", preprocessing)
    cache_seconds = time.perf_counter() - started

    torch.manual_seed(tp.seed)
    shuffle = torch.Generator().manual_seed(tp.seed + 1)
    augment = torch.Generator().manual_seed(ddp.rank_seed(tp.seed + 2, dist_ctx))
    model = build_model(tp.model, len(classes), tp.pretrained, tp.dropout, tp.image_size).to(device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weights(train_data.labels, len(classes), tp.class_weights)
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(device), label_smoothing=tp.label_smoothing
    )
    optimizer = build_optimizer(model, tp, device)
    first_order = batch_order(len(train_data.labels), tp.batch_size, torch.Generator().manual_seed(0), compiles(tp, device))
    steps_per_epoch = len(ddp.rank_batches(first_order, dist_ctx))
    scheduler = build_scheduler(optimizer, tp, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 autocast needs no loss scaling
    forward_model = ddp.wrap_model(model, device, dist_ctx, find_unused=tp.freeze_epochs > 0)
    ctx = EpochContext(forward_model, criterion, optimizer, scheduler, scaler, device, preprocessing, tp, dist_ctx)
    # evaluation and BatchNorm recalibration run the plain module: every rank sees all of val, and a compiled
    # graph is never traced again in eval mode or at evaluation's batch size
    eval_ctx = dataclasses.replace(ctx, model=model)

    progress = Progress()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint["rng"], shuffle, augment)
        progress = Progress(**checkpoint["progress"])
        print(f"resuming from {checkpoint_path} after epoch {progress.epoch}")

    live = open_live(layout, resume=checkpoint is not None) if dist_ctx.is_main else ddp.NoLive()
    try:
        while progress.epoch < tp.epochs and not progress.stopped_early:
            epoch = progress.epoch
            set_backbone_trainable(model, epoch >= tp.freeze_epochs)
            if compiles(tp, device) and epoch >= tp.freeze_epochs and ctx.model is forward_model:
                # compiled once the whole network trains: a graph for the frozen epochs would be thrown away
                ctx = dataclasses.replace(ctx, model=compile_model(forward_model, device, layout.cache_dir))
            metrics = train_one_epoch(ctx, train_data, shuffle, augment, epoch)
            ddp.sync_buffers(model, dist_ctx)
            recalibrate_batchnorm(eval_ctx, model, train_data.images, tp.bn_recalibration_images, tp.seed)
            metrics = ddp.mean_over_ranks(metrics, ("train_loss", "train_accuracy"), dist_ctx)
            metrics.update(evaluate(eval_ctx, val_data, len(classes)))
            metrics["lr"] = scheduler.get_last_lr()[0]
            if not math.isfinite(metrics["val_loss"]):
                raise TrainingError(
                    f"the validation loss became {metrics['val_loss']} after epoch {epoch + 1}; training stopped "
                    "and the last good checkpoint is kept. Lower train.lr or set train.grad_clip"
                )
            value = metrics[tp.early_stopping_metric]
            improved = is_improvement(tp.early_stopping_metric, metrics, progress.best_metrics)
            if improved:
                progress.best_metric, progress.best_epoch = value, epoch + 1
                progress.best_state = portable_state_dict(model)
                progress.best_metrics = dict(metrics)
                progress.epochs_without_improvement = 0
            else:
                progress.epochs_without_improvement += 1
                progress.stopped_early = (
                    progress.epochs_without_improvement >= tp.early_stopping_patience and epoch + 1 < tp.epochs
                )
            progress.epoch = epoch + 1
            progress.train_seconds += metrics["train_seconds"]
            progress.history.append({"epoch": epoch + 1, **metrics})

            live.step = epoch
            for key, val in metrics.items():
                live.log_metric(key, val)
            live.next_step()
            if not dist_ctx.is_main:
                continue
            save_checkpoint(
                checkpoint_path,
                checkpoint_payload(model, ctx, shuffle, augment, progress, params, classes, hashes),
            )
            print(epoch_line(epoch + 1, tp.epochs, metrics, improved), flush=True)
            if progress.stopped_early:
                print(f"early stopping: {tp.early_stopping_metric} did not improve for {tp.early_stopping_patience} epochs")
    finally:
        live.end()

    assert progress.best_state is not None and progress.best_epoch is not None
    model.load_state_dict(progress.best_state)
    total_seconds = time.perf_counter() - started
    images_seen = sum(len(train_data.labels) for _ in progress.history)
    meta = {
        "params": {"train": params.train.model_dump(mode="json"), "full": params.model_dump(mode="json")},
        "data_hash": hashes,
        "num_images": {"train": int(len(train_data.labels)), "val": int(len(val_data.labels))},
        "class_counts": {c: int(n) for c, n in zip(classes, np.bincount(train_data.labels, minlength=len(classes)))},
        "git_commit": git_commit(layout.root),
        "lensmith_version": lensmith.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compiled": compiles(tp, device),
        "timings": {
            "total_seconds": round(total_seconds, 2),
            "cache_seconds": round(cache_seconds, 2),
            "train_seconds": round(progress.train_seconds, 2),
        },
        # the good class as the data resolved it (lensmith.resolve): what decisions by this model assume
        "resolved": resolve(params, pd.concat([train_frame, val_frame], ignore_index=True), classes).model_dict(),
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "best_epoch": progress.best_epoch,
        "best_val_metrics": {k: v for k, v in progress.best_metrics.items() if k.startswith("val_")},
        "history": progress.history,
        "weights_sha256": state_dict_sha256(progress.best_state),
    }
    if dist_ctx.is_main:
        if dist_ctx.enabled:
            meta["distributed"] = {"world_size": dist_ctx.world_size, "backend": "nccl" if device.type == "cuda" else "gloo"}
        save_trained(layout.candidate, model, arch=tp.model, classes=classes, preprocessing=preprocessing, meta=meta)
        plot_curves(progress.history, layout.candidate / CURVES_FILE)
    ddp.finish(dist_ctx)  # the other ranks leave only after rank 0 has written
    return TrainSummary(
        model_dir=layout.candidate,
        arch=tp.model,
        epochs_run=progress.epoch,
        best_epoch=progress.best_epoch,
        metric=tp.early_stopping_metric,
        best_value=float(progress.best_metric),
        stopped_early=progress.stopped_early,
        seconds=total_seconds,
        images_per_second=images_seen / max(progress.train_seconds, 1e-9),
        weights_sha256=meta["weights_sha256"],
    )
