"""`lensmith finetune --site NAME`: adapt the production model to one site with a few of its images.

The production weights are trained for drift.finetune.epochs at drift.finetune.lr with lensmith.train's
own pieces (optimizer, warmup-cosine schedule, train_one_epoch, evaluate), evaluated on held-out
images of the site and on the global test split (lensmith.evaluate.evaluate_model, the metrics
format the gate reads), gated like any candidate (lensmith.gate.evaluate_gate against production)
and, when the gate passes, registered as a new version whose meta.json names the site and the parent version. It is never
promoted here: production stays the global model; a site deployment picks the version explicitly.

run_train cannot start from given weights, so `finetune_model` is the smallest loop over train.py's
public helpers. (A `run_train(..., init_weights=...)` hook in train.py would make it unnecessary.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensmith.errors import DataError
from lensmith.fsutil import write_json_atomic
from lensmith.layout import Layout
from lensmith.params import Params
from lensmith.schema import MEMBER_COLUMNS


@dataclass
class FinetuneSummary:
    site: str
    parent_version: str
    version: str | None
    passed: bool
    reasons: list[str]
    site_accuracy_before: float
    site_accuracy_after: float
    test_accuracy_before: float | None
    test_accuracy_after: float
    n_train: int
    n_site_test: int
    report: Path

    def __str__(self) -> str:
        before = "n/a" if self.test_accuracy_before is None else f"{self.test_accuracy_before:.3f}"
        lines = [
            f"finetune site {self.site}: {self.n_train} training / {self.n_site_test} held-out site images, from {self.parent_version}",
            f"  site accuracy {self.site_accuracy_before:.3f} -> {self.site_accuracy_after:.3f}; "
            f"global test accuracy {before} -> {self.test_accuracy_after:.3f}",
            f"  gate: {'passed' if self.passed else 'rejected'}" + "".join(f"\n    - {r}" for r in self.reasons),
            f"  registered as {self.version} (not promoted)" if self.version else "  not registered (the gate rejected it)",
            f"  report: {self.report}",
        ]
        return "\n".join(lines)


# ---- the site's images -----------------------------------------------------------------------------------


def site_frame(params: Params, layout: Layout, site: str, source: str | None) -> pd.DataFrame:
    """Labelled images of the site: from `source` (a labelled folder, all of it the site) or the manifest's site column."""
    column = params.drift.finetune.site_column
    if source is not None:
        from lensmith.sources import list_source

        listing = list_source(params.data.model_copy(update={"source": source}), layout)
        frame = pd.DataFrame(
            {
                "path": [i.path for i in listing.items],
                "file": [str(i.local_file) for i in listing.items],
                "label": [i.label for i in listing.items],
                "member_offset": pd.array([i.offset for i in listing.items], dtype="Int64"),
                "member_size": pd.array([i.size if i.in_shard else None for i in listing.items], dtype="Int64"),
            }
        )
    else:
        if not layout.manifest.is_file():
            raise DataError(f"no manifest at {layout.manifest}: run `lensmith ingest`, or pass --source with the site's images")
        manifest = pd.read_parquet(layout.manifest)
        if column not in manifest.columns:
            raise DataError(f"the manifest has no {column!r} column (drift.finetune.site_column); pass --source with the site's images")
        frame = manifest[manifest[column].astype(str) == site][["path", "file", "label", *member_columns(manifest)]]
    if frame.empty:
        raise DataError(f"no images of site {site!r} found ({'in ' + source if source else f'manifest column {column!r}'})")
    return frame.reset_index(drop=True)


def member_columns(frame: pd.DataFrame) -> list[str]:
    """The shard-member columns a frame carries (absent in manifests from before shards)."""
    return [c for c in MEMBER_COLUMNS if c in frame.columns]


def split_site(frame: pd.DataFrame, max_images: int, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A stratified (per-label) seeded split into fine-tuning images (at most max_images) and site test images."""
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for _, group in frame.groupby("label", sort=True):
        order = rng.permutation(len(group))
        n_test = max(1, int(round(len(group) * test_fraction))) if len(group) > 1 else 0
        test_parts.append(group.iloc[order[:n_test]])
        train_parts.append(group.iloc[order[n_test:]])
    train = pd.concat(train_parts)
    if len(train) > max_images:
        train = train.sample(n=max_images, random_state=seed)
    return train.reset_index(drop=True), pd.concat(test_parts).reset_index(drop=True)


def check_labels(frame: pd.DataFrame, classes: list[str], site: str) -> None:
    unknown = sorted(set(frame["label"].astype(str)) - set(classes))
    if unknown:
        raise DataError(
            f"site {site!r} images carry labels the production model does not know: {unknown} (model classes: {classes}); "
            "a new label set needs a full retrain, not a fine-tune"
        )


# ---- training --------------------------------------------------------------------------------------------


def finetune_model(trained: Any, train: Any, val: Any, params: Params) -> tuple[Any, list[dict[str, float]]]:
    """Few epochs at a low LR from the given weights with train.py's optimizer, schedule and epoch loop."""
    import torch
    from torch import nn

    from lensmith import train as t
    from lensmith.models import set_backbone_trainable

    ft = params.drift.finetune
    tp = params.train.model_copy(
        update={"epochs": ft.epochs, "lr": ft.lr, "warmup_epochs": 0, "freeze_epochs": 0, "channels_last": False, "seed": ft.seed, "compile": False}
    )
    torch.manual_seed(ft.seed)
    torch.set_num_threads(tp.num_threads or os.cpu_count() or 1)
    device = t.resolve_device(tp.device)
    model = trained.model.to(device)
    set_backbone_trainable(model, not ft.freeze_backbone)
    weights = t.class_weights(train.labels, len(trained.classes), tp.class_weights)
    criterion = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device), label_smoothing=tp.label_smoothing)
    optimizer = t.build_optimizer(model, tp, device)
    steps = len(t.batch_order(len(train.labels), tp.batch_size, torch.Generator().manual_seed(0)))
    scheduler = t.build_scheduler(optimizer, tp, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    ctx = t.EpochContext(model, criterion, optimizer, scheduler, scaler, device, trained.preprocessing, tp)
    shuffle, augment = torch.Generator().manual_seed(ft.seed + 1), torch.Generator().manual_seed(ft.seed + 2)
    history = []
    for epoch in range(tp.epochs):
        metrics = t.train_one_epoch(ctx, train, shuffle, augment, epoch)
        metrics.update(t.evaluate(ctx, val, len(trained.classes)))
        history.append({"epoch": epoch + 1, **metrics})
        print(t.epoch_line(epoch + 1, tp.epochs, {**metrics, "lr": scheduler.get_last_lr()[0]}, False), flush=True)
    model.eval()
    return model, history


def split_data(layout: Layout, frame: pd.DataFrame, classes: list[str], name: str, preprocessing: Any) -> Any:
    from lensmith.splitdata import load_split_data

    return load_split_data(layout, frame, classes, name, preprocessing)


def accuracy_on(model: Any, data: Any, preprocessing: Any, batch_size: int) -> float:
    from lensmith.inference import predict_logits_uint8

    model.eval()
    logits = predict_logits_uint8(model, preprocessing, np.asarray(data.images), batch_size)
    return float((logits.argmax(axis=1) == data.labels).mean())


# ---- evaluation, gate, registry ---------------------------------------------------------------------------


def global_test_metrics(model: Any, trained: Any, params: Params, layout: Layout) -> dict[str, Any]:
    """metrics.json content (the gate's input) for `model` on the global test split."""
    from lensmith.evaluate import decode_images, evaluate_model, label_indices, model_block, read_test_split
    from lensmith.shards import frame_image_refs

    frame = read_test_split(layout)
    y_true = label_indices(frame["label"].astype(str).tolist(), trained.classes)
    images = decode_images(frame_image_refs(frame, layout.root))
    evaluation = evaluate_model(model, trained.preprocessing, trained.classes, images, y_true, frame, params.evaluate, speed_budget_s=0.5)
    evaluation.metrics["model"] = model_block(trained.arch, trained.classes, trained.meta)
    return evaluation.metrics


def run_finetune(params: Params, layout: Layout, site: str, source: str | None = None, register: bool = True) -> FinetuneSummary:
    """Fine-tune production on `site`, evaluate on the site and the global test split, gate and register."""
    from lensmith.gate import evaluate_gate, gate_json, production_champion
    from lensmith.modelio import load_trained, portable_state_dict, save_trained, state_dict_sha256
    from lensmith.jsondoc import dig
    from lensmith.registry import Registry

    ft = params.drift.finetune
    registry = Registry(layout.models)
    parent_dir = registry.resolve("production")
    trained = load_trained(parent_dir, device="cpu")
    frame = site_frame(params, layout, site, source)
    check_labels(frame, trained.classes, site)
    train_frame, test_frame = split_site(frame, ft.max_images, ft.test_fraction, ft.seed)
    if train_frame.empty or test_frame.empty:
        raise DataError(f"site {site!r} has {len(frame)} image(s): too few to both fine-tune and evaluate")
    train = split_data(layout, train_frame, trained.classes, f"site {site} (fine-tune)", trained.preprocessing)
    site_test = split_data(layout, test_frame, trained.classes, f"site {site} (test)", trained.preprocessing)
    before_site = accuracy_on(trained.model, site_test, trained.preprocessing, 64)
    parent_metrics = (registry.show(parent_dir.name).get("metrics") or {})
    model, history = finetune_model(trained, train, site_test, params)
    after_site = accuracy_on(model, site_test, trained.preprocessing, 64)

    metrics = global_test_metrics(model, trained, params, layout)
    metrics["site"] = {"name": site, "accuracy_before": before_site, "accuracy_after": after_site, "n_test": int(len(test_frame)), "n_train": int(len(train_frame))}
    work = Path(tempfile.mkdtemp(prefix=".finetune.", dir=layout.models))
    try:
        state = portable_state_dict(model)
        meta = {
            **{k: v for k, v in trained.meta.items() if k not in ("history", "weights_sha256")},
            "site": site,
            "finetuned_from": parent_dir.name,
            "finetune": {**ft.model_dump(mode="json"), "history": history, "n_train": int(len(train_frame)), "source": source},
            "weights_sha256": state_dict_sha256(state),
        }
        save_trained(work, model, arch=trained.arch, classes=trained.classes, preprocessing=trained.preprocessing, meta=meta)
        write_json_atomic(work / "metrics.json", metrics)
        result = evaluate_gate(metrics, None, production_champion(layout), None, params)
        write_json_atomic(work / "gate.json", {**gate_json(result, work / "metrics.json", meta, None, params), "site": site})
        report_path = layout.reports / f"finetune_{site}.json"
        version = None
        if register and result.passed:  # like the nightly flow: only a candidate the gate passed is registered
            version = registry.register(work, metrics_path=work / "metrics.json", gate_path=work / "gate.json")
        write_json_atomic(
            report_path,
            {"site": site, "parent_version": parent_dir.name, "version": version, "gate": {"passed": result.passed, "reasons": result.reasons}, "metrics": {"site": metrics["site"], "test": {"accuracy": dig(metrics, "test.accuracy"), "macro_f1": dig(metrics, "test.macro_f1")}}, "history": history},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return FinetuneSummary(
        site=site,
        parent_version=parent_dir.name,
        version=version,
        passed=result.passed,
        reasons=result.reasons,
        site_accuracy_before=before_site,
        site_accuracy_after=after_site,
        test_accuracy_before=dig(parent_metrics, "test.accuracy"),
        test_accuracy_after=float(dig(metrics, "test.accuracy")),
        n_train=int(len(train_frame)),
        n_site_test=int(len(test_frame)),
        report=report_path,
    )
