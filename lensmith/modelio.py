"""The trained-model contract that evaluation, export and serving rely on.

models/<dir>/model.pt  plain dict: arch, num_classes, classes, preprocessing (dict), state_dict
models/<dir>/meta.json classes, preprocessing, params, data hash, git commit, timings, best epoch...
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lensmith.errors import LensmithError
from lensmith.fsutil import write_bytes_atomic, write_json_atomic
from lensmith.preprocess import Preprocessing

MODEL_FILE = "model.pt"
META_FILE = "meta.json"


class ModelFileError(LensmithError):
    """A saved model is missing or unreadable."""


@dataclass
class TrainedModel:
    model: nn.Module  # in eval mode
    arch: str
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict[str, Any] = field(default_factory=dict)


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous (not channels_last), detached copies: what gets saved and hashed."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and raw bytes of every tensor (independent of pickling details)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_trained(
    model_dir: Path,
    model: nn.Module,
    *,
    arch: str,
    classes: list[str],
    preprocessing: Preprocessing,
    meta: dict[str, Any],
) -> None:
    """Write model.pt and meta.json into model_dir, each atomically."""
    model_dir = Path(model_dir)
    payload = {
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "state_dict": portable_state_dict(model),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(model_dir / MODEL_FILE, buffer.getvalue())
    full_meta = {"arch": arch, "classes": list(classes), "preprocessing": preprocessing.to_dict(), **meta}
    write_json_atomic(model_dir / META_FILE, full_meta)


def read_model_file(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"no trained model at {path}; run `lensmith train` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable lensmith model ({type(exc).__name__}: {exc})") from None
    missing = {"arch", "num_classes", "classes", "preprocessing", "state_dict"} - set(payload)
    if missing:
        raise ModelFileError(f"{path} lacks {sorted(missing)}; it was not written by lensmith train")
    return payload


def load_trained(model_dir: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the architecture (no pretrained download), load the weights, return it in eval mode."""
    from lensmith.models import build_model

    payload = read_model_file(model_dir)
    preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    model = build_model(
        payload["arch"], payload["num_classes"], pretrained=False, dropout=0.0, image_size=preprocessing.image_size
    )
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    meta_path = Path(model_dir) / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return TrainedModel(
        model=model, arch=payload["arch"], classes=list(payload["classes"]), preprocessing=preprocessing, meta=meta
    )


def load_candidate(layout: Any, device: str = "cpu") -> TrainedModel:
    """models/candidate as a TrainedModel; a missing/corrupt model names the file and the stage that makes it."""
    try:
        return load_trained(layout.candidate, device=device)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} (the candidate model is produced by the train stage: `lensmith train`)") from None
