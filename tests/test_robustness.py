"""Perturbations: each changes the image, more with higher severity, deterministically per seed; FGSM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lensmith.preprocess import Preprocessing
from lensmith.robustness import (
    PERTURBATIONS,
    SEVERITIES,
    fgsm_predictions,
    perturb,
    perturb_all,
    perturbation_rng,
    relative_drop,
    robustness_summary,
)

RANDOM_PERTURBATIONS = ("glare", "noise", "rotation")


def textured_image(size: int = 64, channels: int = 3) -> np.ndarray:
    """Mid-range values (no clipping at either end) with edges and texture, so every perturbation shows."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    base = 128 + 50 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + 30 * ((xx // 8 + yy // 8) % 2 - 0.5)
    img = np.stack([base + 10 * c for c in range(channels)], axis=2)
    return np.clip(img, 30, 220).astype(np.uint8)


def mean_abs_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name", list(PERTURBATIONS))
@pytest.mark.parametrize("channels", [3, 1])
def test_each_perturbation_changes_the_image_more_with_severity(name: str, channels: int) -> None:
    image = textured_image(channels=channels)
    changes = []
    for severity in SEVERITIES:
        out = perturb(image, name, severity, np.random.default_rng(7))
        assert out.shape == image.shape and out.dtype == np.uint8
        changes.append(mean_abs_change(image, out))
    assert changes[0] > 0, f"{name} at severity 1 left the image unchanged"
    assert all(b > a for a, b in zip(changes, changes[1:])), f"{name}: change per severity {changes} is not increasing"


def test_grayscale_hw_images_keep_their_shape() -> None:
    image = textured_image(channels=1)[:, :, 0]
    for name in PERTURBATIONS:
        assert perturb(image, name, 3, np.random.default_rng(0)).shape == image.shape


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_same_seed_same_result(name: str) -> None:
    image = textured_image()
    a = perturb(image, name, 3, np.random.default_rng(123))
    b = perturb(image, name, 3, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", RANDOM_PERTURBATIONS)
def test_random_perturbations_depend_on_the_seed(name: str) -> None:
    image = textured_image()
    outputs = {perturb(image, name, 3, np.random.default_rng(seed)).tobytes() for seed in range(6)}
    assert len(outputs) > 1


def test_perturb_all_is_independent_of_order_and_batching() -> None:
    images = [textured_image(), np.ascontiguousarray(textured_image()[::-1])]
    together = perturb_all(images, "noise", 2, seed=5)
    second_alone = perturb(images[1], "noise", 2, perturbation_rng(5, "noise", 2, 1))
    np.testing.assert_array_equal(together[1], second_alone)
    assert not np.array_equal(together[0], perturb_all(images, "noise", 2, seed=6)[0])


def test_bad_inputs_raise() -> None:
    image = textured_image()
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(image, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        perturb(image, "blur", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        perturb(image.astype(np.float32), "blur", 1, np.random.default_rng(0))


def test_relative_drop_and_summary_shape() -> None:
    assert relative_drop(0.8, 0.6) == pytest.approx(0.25)
    assert relative_drop(0.0, 0.0) == 0.0
    summary = robustness_summary(0.8, {"blur": {1: 0.8, 5: 0.4}, "noise": {3: 0.6}})
    assert summary["clean_accuracy"] == 0.8
    assert summary["perturbations"]["blur"]["5"] == pytest.approx({"accuracy": 0.4, "relative_drop": 0.5})
    assert summary["mean_relative_drop"] == pytest.approx((0.0 + 0.5 + 0.25) / 3)


def brightness_classifier(pixels: int) -> nn.Module:
    """Class 1 when the mean normalised pixel is above 0 (brighter than the preprocessing mean), else class 0."""
    linear = nn.Linear(pixels, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([-torch.ones(pixels), torch.ones(pixels)]) / pixels)
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_fgsm_zero_epsilon_is_clean_and_large_epsilon_flips_predictions() -> None:
    pre = Preprocessing(image_size=8, resize=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = brightness_classifier(3 * 8 * 8)
    labels = np.array([0, 0, 1, 1])
    batch = np.stack([np.full((3, 8, 8), v, dtype=np.uint8) for v in (60, 70, 190, 200)])
    np.testing.assert_array_equal(fgsm_predictions(model, pre, batch, labels, 0.0), labels)
    # 0.1 = 25 grey levels: every image is at least 57 levels from the decision boundary at 127.5
    np.testing.assert_array_equal(fgsm_predictions(model, pre, batch, labels, 0.1), labels)
    np.testing.assert_array_equal(fgsm_predictions(model, pre, batch, labels, 0.5), 1 - labels)
