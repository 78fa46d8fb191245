"""Deployment-condition perturbations on decoded uint8 images, plus FGSM.

Each perturbation is `f(image, severity, rng) -> image`: `image` is an HxWxC (C = 1 or 3) or HxW
uint8 array as decoded from the file, BEFORE the shared preprocessing; the result has the same shape
and dtype. Severities run 1..5 (mildest..harshest). Spatial parameters (blur radius, glare size)
scale with the image's shorter side so a severity means about the same thing at 128 px and at
4000 px (blur keeps at least its 128 px strength, so small images are still blurred).
Randomness (noise, glare position, rotation direction) comes only from `rng`: same seed, same image.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from lensmith.preprocess import Preprocessing

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

BRIGHTNESS_UP_DELTA = (0.1, 0.2, 0.3, 0.4, 0.5)  # added, on the 0..1 scale (over-exposure)
BRIGHTNESS_DOWN_FACTOR = (0.8, 0.65, 0.5, 0.35, 0.2)  # multiplied (under-exposure)
GLARE_RADIUS = (0.15, 0.2, 0.25, 0.3, 0.4)  # Gaussian sigma of the highlight, fraction of the shorter side
GLARE_PEAK = (0.5, 0.6, 0.7, 0.8, 0.95)  # blend weight towards white at the highlight's centre
BLUR_SIGMA_PX = (0.6, 1.0, 1.5, 2.3, 3.3)  # Gaussian sigma in pixels at a 128 px shorter side; scales up above it
BLUR_REFERENCE_SIDE = 128
NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)  # Gaussian, on the 0..1 scale
ROTATION_DEGREES = (5.0, 10.0, 15.0, 25.0, 35.0)  # direction drawn from rng
JPEG_QUALITY = (60, 40, 25, 15, 8)

Perturbation = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _level(table: Sequence[float], severity: int) -> float:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    return table[severity - 1]


def _as_hwc(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"perturbations take uint8 images, got {image.dtype}")
    return image[:, :, None] if image.ndim == 2 else image


def _like(result: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Back to the original's shape (HxW stays HxW)."""
    return result.reshape(original.shape)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _to_pil(hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(hwc[:, :, 0], "L") if hwc.shape[2] == 1 else Image.fromarray(hwc, "RGB")


def _from_pil(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def brightness_up(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hwc = _as_hwc(image)
    return _like(_to_uint8(hwc.astype(np.float32) + 255.0 * _level(BRIGHTNESS_UP_DELTA, severity)), image)


def brightness_down(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hwc = _as_hwc(image)
    return _like(_to_uint8(hwc.astype(np.float32) * _level(BRIGHTNESS_DOWN_FACTOR, severity)), image)


def glare(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A specular highlight: a Gaussian blob blended towards white at a random spot in the central area."""
    hwc = _as_hwc(image)
    h, w = hwc.shape[:2]
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    sigma = _level(GLARE_RADIUS, severity) * min(h, w)
    yy, xx = np.ogrid[:h, :w]
    weight = _level(GLARE_PEAK, severity) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    weight = weight.astype(np.float32)[:, :, None]
    return _like(_to_uint8(hwc.astype(np.float32) * (1 - weight) + 255.0 * weight), image)


def blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian defocus blur."""
    hwc = _as_hwc(image)
    radius = _level(BLUR_SIGMA_PX, severity) * max(1.0, min(hwc.shape[:2]) / BLUR_REFERENCE_SIDE)
    return _like(_from_pil(_to_pil(hwc).filter(ImageFilter.GaussianBlur(radius))), image)


def noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    hwc = _as_hwc(image)
    std = 255.0 * _level(NOISE_STD, severity)
    return _like(_to_uint8(hwc.astype(np.float32) + rng.normal(0.0, std, size=hwc.shape).astype(np.float32)), image)


def rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Camera tilt: rotation about the centre by the severity's angle, random direction.

    The uncovered corners are filled with the image's mean colour, not black, so that the change is
    the tilt and not a dark border.
    """
    hwc = _as_hwc(image)
    angle = _level(ROTATION_DEGREES, severity) * (1 if rng.random() < 0.5 else -1)
    mean = tuple(int(v) for v in np.rint(hwc.reshape(-1, hwc.shape[2]).mean(axis=0)))
    fill = mean[0] if hwc.shape[2] == 1 else mean
    rotated = _to_pil(hwc).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return _like(_from_pil(rotated), image)


def jpeg(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Recompression at a lower JPEG quality (what a bandwidth-starved camera link does)."""
    hwc = _as_hwc(image)
    buffer = io.BytesIO()
    _to_pil(hwc).save(buffer, format="JPEG", quality=int(_level(JPEG_QUALITY, severity)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return _like(_from_pil(decoded.convert("L" if hwc.shape[2] == 1 else "RGB")), image)


PERTURBATIONS: dict[str, Perturbation] = {
    "brightness_up": brightness_up,
    "brightness_down": brightness_down,
    "glare": glare,
    "blur": blur,
    "noise": noise,
    "rotation": rotation,
    "jpeg": jpeg,
}


def perturb(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    try:
        fn = PERTURBATIONS[name]
    except KeyError:
        raise ValueError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}") from None
    return fn(image, severity, rng)


def perturbation_rng(seed: int, name: str, severity: int, index: int) -> np.random.Generator:
    """A generator per (perturbation, severity, image): results do not depend on evaluation order or batching."""
    return np.random.default_rng([seed, list(PERTURBATIONS).index(name), severity, index])


def perturb_all(images: Sequence[np.ndarray], name: str, severity: int, seed: int = 0) -> list[np.ndarray]:
    return [perturb(img, name, severity, perturbation_rng(seed, name, severity, i)) for i, img in enumerate(images)]


# ---- summaries ------------------------------------------------------------------------------------------


def relative_drop(clean_accuracy: float, perturbed_accuracy: float) -> float:
    """(clean - perturbed) / clean; 0 when clean accuracy is 0 (nothing left to lose)."""
    return float((clean_accuracy - perturbed_accuracy) / clean_accuracy) if clean_accuracy > 0 else 0.0


def robustness_summary(
    clean_accuracy: float, accuracies: dict[str, dict[int, float]]
) -> dict[str, object]:
    """{clean_accuracy, perturbations: {name: {"<severity>": {accuracy, relative_drop}}}, mean_relative_drop}."""
    perturbations = {
        name: {
            str(severity): {"accuracy": float(acc), "relative_drop": relative_drop(clean_accuracy, acc)}
            for severity, acc in sorted(by_severity.items())
        }
        for name, by_severity in accuracies.items()
    }
    drops = [cell["relative_drop"] for by_sev in perturbations.values() for cell in by_sev.values()]
    return {
        "clean_accuracy": float(clean_accuracy),
        "perturbations": perturbations,
        "mean_relative_drop": float(np.mean(drops)) if drops else None,
    }


# ---- FGSM -----------------------------------------------------------------------------------------------


def fgsm_predictions(
    model: torch.nn.Module,
    preprocessing: Preprocessing,
    batch_nchw_uint8: np.ndarray,
    labels: np.ndarray,
    epsilon: float,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predicted classes after a one-step FGSM attack on the preprocessed model input.

    `epsilon` is in pixel units on the 0..1 scale (8/255 = eight grey levels), i.e. applied to the
    image in [0, 1] before mean/std normalisation; the adversarial image is clamped to [0, 1].
    """
    x01 = torch.as_tensor(batch_nchw_uint8, device=device).float().div_(255.0).requires_grad_(True)
    target = torch.as_tensor(labels, dtype=torch.long, device=device)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(preprocessing.normalize_tensor(x01 * 255.0)), target)
        (grad,) = torch.autograd.grad(loss, x01)
    adversarial = (x01 + epsilon * grad.sign()).clamp_(0.0, 1.0).detach()
    with torch.inference_mode():
        return model(preprocessing.normalize_tensor(adversarial * 255.0)).argmax(dim=1).cpu().numpy()
