"""lensmith train on a tiny generated project: outputs, determinism, schedule, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lensmith import train as train_module
from lensmith.errors import DataError, LensmithError
from lensmith.layout import Layout
from lensmith.modelio import load_trained, state_dict_sha256
from lensmith.models import backbone_parameters, build_model
from lensmith.params import Params
from lensmith.train import CheckpointError, TrainingError, class_weights, run_train, warmup_cosine

COLOURS = {"crack": (200, 40, 40), "ok": (40, 200, 40), "stain": (40, 40, 200)}


def make_project(root: Path, per_class: int = 8, classes: tuple[str, ...] = ("crack", "ok", "stain")) -> Layout:
    """A tiny project: coloured squares on noise, 3/4 of each class in train, 1/4 in val."""
    rng = np.random.default_rng(0)
    rows = []
    for label in classes:
        for i in range(per_class):
            pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8)
            pixels[9:27, 9:27] = COLOURS[label]
            path = root / "raw" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            rows.append({
                "file": str(path.relative_to(root)), "path": f"{label}/{i}.png", "label": label,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "site": "A",
                "split": "val" if i % 4 == 3 else "train",
            })
    frame = pd.DataFrame(rows)
    layout = Layout(root)
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val"):
        frame[frame.split == name].drop(columns="split").to_parquet(layout.split_file(name), index=False)
    frame.iloc[:0].drop(columns="split").to_parquet(layout.split_file("test"), index=False)
    return layout


def tiny_params(**train: Any) -> Params:
    base = {"image_size": 32, "epochs": 2, "batch_size": 8, "pretrained": False, "num_threads": 1, "freeze_epochs": 0}
    return Params.model_validate({"train": {**base, **train}})


@pytest.fixture()
def project(tmp_path: Path) -> Layout:
    return make_project(tmp_path / "p")


def test_train_writes_the_candidate_model_meta_checkpoint_and_curves(project: Layout) -> None:
    summary = run_train(tiny_params(pretrained=True, freeze_epochs=1), project)
    out = project.candidate
    for name in ("model.pt", "meta.json", "checkpoint.pt", "training_curves.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["crack", "ok", "stain"]
    assert meta["preprocessing"]["image_size"] == 32
    assert meta["params"]["train"]["epochs"] == 2 and "split" in meta["params"]["full"]
    assert set(meta["data_hash"]) >= {"combined", "data/splits/train.parquet", "data/splits/val.parquet"}
    assert meta["best_epoch"] in (1, 2) and "val_macro_f1" in meta["best_val_metrics"]
    assert meta["timings"]["total_seconds"] > 0 and meta["lensmith_version"]
    assert len(meta["history"]) == 2
    metrics = json.loads((project.reports / "train" / "metrics.json").read_text())
    assert "val_macro_f1" in metrics and metrics["step"] == 1
    assert (project.reports / "train" / "plots" / "metrics" / "val_loss.tsv").is_file()
    assert not (project.root / "dvc.yaml").exists()  # dvclive must not write pipeline files itself
    loaded = load_trained(out)
    assert loaded.arch == "efficientnet_lite0" and loaded.classes == ["crack", "ok", "stain"]
    assert state_dict_sha256(loaded.model.state_dict()) == meta["weights_sha256"] == summary.weights_sha256
    assert "best epoch" in str(summary) and "model.pt" in str(summary)


@pytest.mark.slow
def test_same_data_params_and_seed_give_byte_identical_weights(tmp_path: Path) -> None:
    params = tiny_params(epochs=2)
    first = run_train(params, make_project(tmp_path / "a"))
    second = run_train(params, make_project(tmp_path / "b"))
    a = torch.load(tmp_path / "a/models/candidate/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b/models/candidate/model.pt", weights_only=True)["state_dict"]
    assert first.weights_sha256 == second.weights_sha256 == state_dict_sha256(a) == state_dict_sha256(b)
    other_seed = run_train(tiny_params(epochs=2, seed=1), make_project(tmp_path / "c"))
    assert other_seed.weights_sha256 != first.weights_sha256


def test_freeze_epochs_train_only_the_head(project: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[torch.nn.Module] = []

    def keep(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build_model(*args, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(train_module, "build_model", keep)
    torch.manual_seed(0)
    reference = build_model("efficientnet_lite0", 3, pretrained=True, dropout=0.2, image_size=32)
    run_train(tiny_params(pretrained=True, epochs=1, freeze_epochs=1), project)
    for trained, initial in zip(backbone_parameters(built[0]), backbone_parameters(reference)):
        assert torch.equal(trained.detach().contiguous(), initial.detach())


def test_early_stopping_stops_after_patience(project: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        train_module, "evaluate", lambda *a, **k: {"val_loss": 1.0, "val_accuracy": 0.5, "val_macro_f1": 0.5}
    )
    summary = run_train(tiny_params(epochs=6, early_stopping_patience=2), project)
    assert summary.stopped_early and summary.epochs_run == 3 and summary.best_epoch == 1


def test_class_weights_and_schedule() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 2, "auto")
    assert weights is not None and torch.allclose(weights, torch.tensor([4 / 6, 4 / 2]))
    assert class_weights(np.array([0, 1]), 2, "none") is None
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------- bad input


def test_empty_train_split_is_a_clear_error(project: Layout) -> None:
    pd.read_parquet(project.split_file("train")).iloc[:0].to_parquet(project.split_file("train"), index=False)
    with pytest.raises(DataError, match="train split .* is empty"):
        run_train(tiny_params(), project)


def test_missing_split_is_a_clear_error(project: Layout) -> None:
    project.split_file("val").unlink()
    with pytest.raises(DataError, match="run `lensmith split` first"):
        run_train(tiny_params(), project)


def test_single_class_is_a_clear_error(tmp_path: Path) -> None:
    layout = make_project(tmp_path / "p", classes=("ok",))
    with pytest.raises(DataError, match="single class .*'ok'"):
        run_train(tiny_params(), layout)


def test_val_label_missing_from_train_is_a_clear_error(project: Layout) -> None:
    val = pd.read_parquet(project.split_file("val"))
    val.loc[0, "label"] = "scratch"
    val.to_parquet(project.split_file("val"), index=False)
    with pytest.raises(DataError, match=r"val split has labels absent from the train split: \['scratch'\]"):
        run_train(tiny_params(), project)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    project: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def poisoned(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build_model(*args, **kwargs)
        steps_per_epoch = 3  # 18 training images in batches of 8, 8 and 2

        def nan_after_first_epoch(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if module.training:
                calls["n"] += 1
                if calls["n"] > steps_per_epoch:
                    return output * float("nan")
            return None

        model._fc.register_forward_hook(nan_after_first_epoch)
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at epoch 2.*last good checkpoint is kept"):
        run_train(tiny_params(epochs=3), project)
    checkpoint = torch.load(project.candidate / "checkpoint.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert not (project.candidate / "model.pt").exists()


def test_resume_without_checkpoint_is_a_clear_error(project: Layout) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*without --resume"):
        run_train(tiny_params(), project, resume=True)


def test_resume_from_corrupt_checkpoint_is_a_clear_error(project: Layout) -> None:
    project.candidate.mkdir(parents=True)
    (project.candidate / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        run_train(tiny_params(), project, resume=True)


def test_resume_with_changed_params_is_a_clear_error(project: Layout) -> None:
    run_train(tiny_params(epochs=1), project)
    with pytest.raises(CheckpointError, match="train.lr"):
        run_train(tiny_params(epochs=1, lr=0.5), project, resume=True)


@pytest.mark.slow
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tiny_params(epochs=3, pretrained=True, freeze_epochs=1)
    reference = run_train(params, make_project(tmp_path / "ref"))

    layout = make_project(tmp_path / "cut")
    real_epoch = train_module.train_one_epoch

    def interrupted(ctx: Any, data: Any, shuffle: Any, augment: Any, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(ctx, data, shuffle, augment, epoch)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(params, layout)
    monkeypatch.setattr(train_module, "train_one_epoch", real_epoch)
    resumed = run_train(params, layout, resume=True)
    assert resumed.weights_sha256 == reference.weights_sha256
    assert isinstance(resumed, train_module.TrainSummary) and not isinstance(resumed, LensmithError)


def test_precise_batchnorm_statistics_are_the_average_over_clean_images() -> None:
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lensmith.preprocess import Preprocessing
    from lensmith.train import recalibrate_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.01))
    model[1].running_mean.fill_(123.0)  # stale statistics, as a slow momentum leaves them
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    pre = Preprocessing(image_size=8, resize=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    ctx = SimpleNamespace(
        tp=SimpleNamespace(batch_size=20, channels_last=False), autocast=nullcontext(), preprocessing=pre, device=torch.device("cpu"),
        pinned=False,
    )
    model.eval()
    used = recalibrate_batchnorm(ctx, model, images, limit=40, seed=0)  # type: ignore[arg-type]
    with torch.no_grad():
        features = model[0](pre.normalize_tensor(torch.from_numpy(images)))
    assert used == 40 and not model.training and model[1].momentum == 0.01
    assert model[1].running_mean.numpy() == pytest.approx(features.mean(dim=(0, 2, 3)).numpy(), abs=1e-4)
    assert recalibrate_batchnorm(ctx, model, images, limit=0, seed=0) == 0  # type: ignore[arg-type]


def test_a_tie_on_the_early_stopping_metric_goes_to_the_lower_validation_loss() -> None:
    from lensmith.train import is_improvement

    best = {"val_macro_f1": 0.981, "val_loss": 0.14}
    assert is_improvement("val_macro_f1", {"val_macro_f1": 0.981, "val_loss": 0.11}, best)
    assert not is_improvement("val_macro_f1", {"val_macro_f1": 0.981, "val_loss": 0.15}, best)
    assert not is_improvement("val_macro_f1", {"val_macro_f1": 0.980, "val_loss": 0.01}, best)
    assert is_improvement("val_loss", {"val_macro_f1": 0.5, "val_loss": 0.13}, best)
    assert is_improvement("val_accuracy", {"val_accuracy": 0.9, "val_loss": 9.0}, {})


def compiled_run(project: Layout, monkeypatch: pytest.MonkeyPatch, **train: Any) -> tuple[Any, list[str]]:
    """run_train with the compiled path on the CPU (dynamo's `eager` backend: the same graph capture and
    guards as on CUDA, without Inductor's code generation), failing on any recompile."""
    import torch._dynamo as dynamo

    monkeypatch.setattr(train_module, "COMPILE_CPU_BACKEND", "eager")
    monkeypatch.setattr(dynamo.config, "error_on_recompile", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(project.root / ".cache" / "torchinductor"))
    dynamo.reset()
    compiled: list[str] = []
    real = train_module.compile_model

    def counting(model: torch.nn.Module, device: torch.device, cache_dir: Path) -> torch.nn.Module:
        compiled.append(str(device))
        return real(model, device, cache_dir)

    monkeypatch.setattr(train_module, "compile_model", counting)
    try:
        return run_train(tiny_params(compile=True, **train), project), compiled
    finally:
        dynamo.reset()


def test_compiled_training_compiles_once_after_the_frozen_epochs_and_never_recompiles(
    project: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo as dynamo

    # 18 training images in batches of 8: a short last batch of 2 every epoch; the backbone unfreezes at epoch 2
    summary, compiled = compiled_run(project, monkeypatch, epochs=3, freeze_epochs=1)
    assert compiled == ["cpu"]  # one compile, at the unfreeze, kept for epochs 2 and 3
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward really ran through dynamo
    assert summary.epochs_run == 3
    assert json.loads((project.candidate / "meta.json").read_text())["compiled"] is True


def test_a_short_last_batch_would_recompile_the_graph_which_is_why_it_is_dropped(
    project: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module.EpochContext, "drop_last", property(lambda self: False))
    with pytest.raises(Exception, match="(?i)recompil"):
        compiled_run(project, monkeypatch, epochs=2, freeze_epochs=0)


def test_compiled_training_drops_the_short_last_batch_only(project: Layout) -> None:
    shuffle = torch.Generator().manual_seed(0)
    assert [len(b) for b in train_module.batch_order(18, 8, shuffle)] == [8, 8, 2]
    assert [len(b) for b in train_module.batch_order(18, 8, shuffle, drop_last=True)] == [8, 8]
    assert [len(b) for b in train_module.batch_order(17, 8, shuffle)] == [8, 8]  # a batch of one: never
    assert [len(b) for b in train_module.batch_order(5, 8, shuffle, drop_last=True)] == [5]  # one batch is kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA stream synchronisation needs a CUDA device (none on this machine)")
def test_a_cuda_epoch_leaves_the_gpu_busy_it_waits_only_at_the_periodic_checks(tmp_path: Path) -> None:
    """torch's sync debug mode warns at every operation that makes the host wait for the GPU (a blocking copy,
    a mask index, .item()): 40 steps may wait only at the 2 loss checks and the epoch's final reads."""
    import warnings

    from lensmith.splitdata import SplitData

    tp = tiny_params(batch_size=8, augment={"hue": 0.1, "blur_prob": 0.5, "noise_std": 0.05}).train
    device = torch.device("cuda")
    images = np.random.default_rng(0).integers(0, 256, (320, 3, 32, 32), dtype=np.uint8)
    data = SplitData(images=images, labels=np.arange(320) % 3, files=[])
    model = build_model(tp.model, 3, False, tp.dropout, tp.image_size).to(device, memory_format=torch.channels_last)
    optimizer = train_module.build_optimizer(model, tp, device)
    ctx = train_module.EpochContext(
        model, torch.nn.CrossEntropyLoss(), optimizer, train_module.build_scheduler(optimizer, tp, 40),
        torch.amp.GradScaler("cuda", enabled=False), device, train_module.preprocessing_for(tp.model, tp.image_size), tp,
    )
    shuffle, augment = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    train_module.train_one_epoch(ctx, data, shuffle, augment, 0)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_module.train_one_epoch(ctx, data, shuffle, augment, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 8, [str(w.message)[:200] for w in syncs]
