"""Batched prediction through the model's own `Preprocessing`, and CPU latency/throughput measurement.

Inputs may be decoded PIL images or HxWxC / HxW uint8 arrays at any size: both go through
`Preprocessing.to_uint8` (resize, crop, channels) and `normalize_tensor`, the one preprocessing definition.
The model is a torch module (or a TrainedModel) or anything with `logits_uint8(N x C x H x W uint8)`, such as the
served ONNX model (lensmith.onnxmodel.OnnxModel): evaluation measures the artifact that is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lensmith.preprocess import Preprocessing

ImageLike = Image.Image | np.ndarray


def _unwrap(trained_or_model: Any) -> Any:
    """Accept a modelio.TrainedModel, a bare nn.Module or a model with `logits_uint8` (ONNX)."""
    return trained_or_model if hasattr(trained_or_model, "logits_uint8") else getattr(trained_or_model, "model", trained_or_model)


def uint8_runner(model: Any, preprocessing: Preprocessing) -> Callable[[np.ndarray], Any]:
    """One forward pass on N x C x H x W uint8 at the input size (normalisation included)."""
    if hasattr(model, "logits_uint8"):
        return model.logits_uint8

    def run(batch: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(preprocessing.normalize_tensor(torch.as_tensor(batch)))

    return run


def thread_count(model: Any) -> int:
    return int(getattr(model, "threads", 0) or 0) if hasattr(model, "logits_uint8") else torch.get_num_threads()


def array_to_pil(image: np.ndarray) -> Image.Image:
    """HxW / HxWx1 -> mode L, HxWx3 -> RGB (uint8 only)."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return Image.fromarray(image, "L")
    if image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image, "RGB")
    raise ValueError(f"expected HxW, HxWx1 or HxWx3, got shape {image.shape}")


def preprocess_uint8(images: Sequence[ImageLike], preprocessing: Preprocessing) -> np.ndarray:
    """Decoded images -> N x C x H x W uint8 at the model's input size (no normalisation yet)."""
    if not len(images):
        c = preprocessing.num_channels
        return np.zeros((0, c, preprocessing.image_size, preprocessing.image_size), dtype=np.uint8)
    arrays = [preprocessing.to_uint8(img if isinstance(img, Image.Image) else array_to_pil(img)) for img in images]
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def predict_logits_uint8(
    model: Any,
    preprocessing: Preprocessing,
    batch_nchw_uint8: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Logits (N x C float32) for already preprocessed uint8 input, in batches of `batch_size`."""
    if hasattr(model, "logits_uint8"):
        outputs = [np.asarray(model.logits_uint8(np.ascontiguousarray(batch_nchw_uint8[part])), dtype=np.float32)
                   for part in _batches(len(batch_nchw_uint8), batch_size)]
        if not outputs:
            raise ValueError("no images to predict")
        return np.concatenate(outputs)
    outputs = []
    with torch.inference_mode():
        for part in _batches(len(batch_nchw_uint8), batch_size):
            chunk = batch_nchw_uint8[part]
            if not chunk.flags.writeable:  # a read-only memmap: torch warns about non-writable arrays (a uint8 copy is cheap)
                chunk = chunk.copy()
            x = torch.as_tensor(chunk, device=device)
            outputs.append(model(preprocessing.normalize_tensor(x)).float().cpu().numpy())
    if not outputs:
        raise ValueError("no images to predict")
    return np.concatenate(outputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def predict_probabilities(
    trained_or_model: Any,
    preprocessing: Preprocessing,
    images: Sequence[ImageLike] | np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class probabilities (N x C float64, rows sum to 1).

    `images`: decoded PIL images / uint8 arrays of any size, or an N x C x H x W uint8 array that is
    already at the model's input size (the output of `preprocess_uint8`).
    """
    model = _unwrap(trained_or_model)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = images
    else:
        # Preprocess chunk by chunk so large test sets never hold every resized image twice.
        parts = [
            predict_logits_uint8(model, preprocessing, preprocess_uint8(images[s], preprocessing), batch_size, device)
            for s in _batches(len(images), batch_size)
        ]
        if not parts:
            raise ValueError("no images to predict")
        return softmax(np.concatenate(parts))
    return softmax(predict_logits_uint8(model, preprocessing, batch, batch_size, device))


# ---- speed ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedReport:
    images_per_s: float
    batch_size: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_runs: int
    num_threads: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "images_per_s": self.images_per_s,
            "batch_size": self.batch_size,
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p95": self.latency_ms_p95,
            "latency_runs": self.latency_runs,
            "num_threads": self.num_threads,
        }


def _synthetic_input(preprocessing: Preprocessing, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = preprocessing.image_size
    return rng.integers(0, 256, (n, preprocessing.num_channels, size, size), dtype=np.uint8)


def measure_throughput(
    model: Any,
    preprocessing: Preprocessing,
    batch_size: int,
    *,
    min_batches: int = 3,
    budget_s: float = 5.0,
) -> float:
    """Images/s of normalisation + forward pass at `batch_size` (decoding and resizing excluded).

    One warm-up batch, then batches until `min_batches` ran and `budget_s` is spent.
    """
    run = uint8_runner(_unwrap(model), preprocessing)
    x = _synthetic_input(preprocessing, batch_size)
    run(x)
    done, start = 0, time.perf_counter()
    while True:
        run(x)
        done += 1
        if done >= min_batches and time.perf_counter() - start >= budget_s:
            break
    elapsed = time.perf_counter() - start
    return float(done * batch_size / elapsed)


def measure_latency_ms(
    model: Any,
    preprocessing: Preprocessing,
    *,
    warmup: int = 3,
    min_runs: int = 10,
    max_runs: int = 200,
    budget_s: float = 5.0,
) -> np.ndarray:
    """Batch-1 latencies in milliseconds (normalisation + forward), between min_runs and max_runs runs."""
    run = uint8_runner(_unwrap(model), preprocessing)
    x = _synthetic_input(preprocessing, 1)
    times = []
    for _ in range(warmup):
        run(x)
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return np.asarray(times)


def measure_speed(
    trained_or_model: Any, preprocessing: Preprocessing, batch_size: int, budget_s: float = 5.0
) -> SpeedReport:
    """Throughput at `batch_size` and batch-1 latency percentiles on this machine's CPU threads."""
    model = _unwrap(trained_or_model)
    latencies = measure_latency_ms(model, preprocessing, budget_s=budget_s)
    return SpeedReport(
        images_per_s=measure_throughput(model, preprocessing, batch_size, budget_s=budget_s),
        batch_size=batch_size,
        latency_ms_p50=float(np.percentile(latencies, 50)),
        latency_ms_p95=float(np.percentile(latencies, 95)),
        latency_runs=int(len(latencies)),
        num_threads=thread_count(model),
    )
