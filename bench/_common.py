"""Helpers shared by the training benchmarks: demo-data projects, group-aware splits, test scoring."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensmith.datacache import cached_images  # noqa: E402
from lensmith.layout import Layout  # noqa: E402
from lensmith.modelio import load_trained  # noqa: E402
from lensmith.shards import frame_image_refs  # noqa: E402
from lensmith.splitdata import image_hashes  # noqa: E402


def ensure_demo_data(out: Path, per_class: int = 500, image_size: int = 128, seed: int = 0) -> Path:
    from lensmith.demodata import generate_demo_dataset

    if not (out / "metadata.csv").is_file():
        print(generate_demo_dataset(out, sites=None, seed=seed, per_class=per_class, image_size=image_size))
    return out


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_by_batch(meta: pd.DataFrame, seed: int = 0, fractions: tuple[float, float] = (0.70, 0.15)) -> pd.Series:
    """train/val/test per row; whole `batch` groups go to one split, per class (stratified by group)."""
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for _, groups in meta.groupby("label")["batch"]:
        batches = sorted(set(groups))
        rng.shuffle(batches)
        n = len(batches)
        n_train, n_val = round(n * fractions[0]), max(1, round(n * fractions[1]))
        for i, b in enumerate(batches):
            assignment[b] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return meta["batch"].map(assignment)


def write_splits(root: Path, meta: pd.DataFrame, split: pd.Series) -> Layout:
    layout = Layout(root)
    layout.splits_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        meta[split == name].reset_index(drop=True).to_parquet(layout.split_file(name), index=False)
    return layout


def demo_metadata(demo: Path) -> pd.DataFrame:
    meta = pd.read_csv(demo / "metadata.csv")
    meta["file"] = [str(demo / p) for p in meta["path"]]
    meta["sha256"] = [sha256_file(Path(f)) for f in meta["file"]]
    return meta


def limit_per_class(frame: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    return frame.groupby("label", group_keys=False).apply(lambda g: g.sample(min(n, len(g)), random_state=seed))


def test_scores(layout: Layout, model_dir: Path | None = None) -> dict[str, float]:
    trained = load_trained(model_dir or layout.candidate)
    frame = pd.read_parquet(layout.split_file("test"))
    files = frame_image_refs(frame, layout.root)
    images = cached_images(files, image_hashes(frame, files), trained.preprocessing, layout.cache_dir)
    index = {c: i for i, c in enumerate(trained.classes)}
    labels = frame["label"].astype(str).map(index).to_numpy()
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(images), 256):
            batch = torch.from_numpy(np.array(images[start : start + 256]))
            x = trained.preprocessing.normalize_tensor(batch).contiguous(memory_format=torch.channels_last)
            predictions.append(trained.model(x).argmax(1).numpy())
    pred = np.concatenate(predictions)
    return {
        "test_accuracy": float((pred == labels).mean()),
        "test_macro_f1": float(f1_score(labels, pred, average="macro")),
        "n_test": int(len(labels)),
    }


def cpu_flags() -> str:
    """The CPU flags that change these figures (avx2, avx512f, avx512_vnni), comma-separated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags) or "none of avx2/avx512f/avx512_vnni"
