"""Training augmentation on uint8 image batches, from `train.augment` params.

Every random draw comes from an explicit torch.Generator, so a run is reproducible and a resumed run
draws exactly what the uninterrupted one would have. Parameters are drawn per image but applied to the
whole batch at once (one grid_sample for crop + rotation + flips, broadcast colour factors): applying a
v2.Compose image by image costs as much as the forward pass of a small CNN on 2 cores.
Colour ops follow torchvision.transforms.v2 definitions and use its functional kernels where they exist.

The batch is augmented where it lives: training moves the uint8 batch to the GPU once (a quarter of the
float32 bytes) and every op below runs there. The per-image parameters are drawn on the CPU generator and
moved as small tensors, so a run draws the same stream on any device; only the noise image, as large as
the batch, is drawn on the device from a seed taken from that stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lensmith.params import AugmentParams


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _coin(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _to(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device` without stalling: a blocking copy would make the host wait until the
    GPU has finished every queued step (the staging copy of pageable memory keeps non_blocking safe)."""
    return values.to(device, non_blocking=True)


def _chosen_index(chosen: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices of the True entries of a CPU mask, on `device`. Indexing a GPU batch with a mask would read
    the mask's count back from the GPU (a sync); with indices found on the CPU the shape is known."""
    return _to(chosen.nonzero().squeeze(1), device)


def affine_theta(params: AugmentParams, n: int, generator: torch.Generator) -> torch.Tensor:
    """N x 2 x 3 matrices mapping output to input coordinates: RandomResizedCrop + rotation + flips."""
    lo, hi = params.crop_scale
    area = _uniform(n, lo, hi, generator)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), generator)
    ratio = torch.exp(log_ratio)
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    too_wide = (w > 1) | (h > 1)  # torchvision falls back to a square-ish crop; keep the area, drop the ratio
    w = torch.where(too_wide, torch.sqrt(area), w)
    h = torch.where(too_wide, torch.sqrt(area), h)
    cx = _uniform(n, -1.0, 1.0, generator) * (1 - w)
    cy = _uniform(n, -1.0, 1.0, generator) * (1 - h)
    angle = torch.deg2rad(_uniform(n, -params.rotation_degrees, params.rotation_degrees, generator))
    sx = torch.where(_coin(n, 0.5 if params.hflip else 0.0, generator), -w, w)
    sy = torch.where(_coin(n, 0.5 if params.vflip else 0.0, generator), -h, h)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack(
        [torch.stack([cos * sx, -sin * sy, cx], dim=1), torch.stack([sin * sx, cos * sy, cy], dim=1)], dim=1
    )


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2's blend: factor * images + (1 - factor) * other, factor per image."""
    f = _to(factor, images.device).view(-1, 1, 1, 1)
    return f * images + (1 - f) * other


def colour_jitter(images: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation (RGB only) and hue on float 0..255 N x C x H x W."""
    n, channels = images.shape[:2]
    b, c, s = params.brightness, params.contrast, params.saturation
    if b > 0:
        images = images.mul_(_to(_uniform(n, 1 - b, 1 + b, generator), images.device).view(-1, 1, 1, 1))
    if c > 0:
        gray = TF.rgb_to_grayscale(images) if channels == 3 else images
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        images = _blend(images, mean, _uniform(n, 1 - c, 1 + c, generator))
    if s > 0 and channels == 3:
        images = _blend(images, TF.rgb_to_grayscale(images), _uniform(n, 1 - s, 1 + s, generator))
    if params.hue > 0 and channels == 3:
        shift = _uniform(1, -params.hue, params.hue, generator).item()
        chosen = _coin(n, 0.5, generator)
        if chosen.any():
            index = _chosen_index(chosen, images.device)
            images = images.clamp(0, 255)
            images[index] = TF.adjust_hue(images[index] / 255.0, shift) * 255.0
    return images.clamp_(0, 255)


def random_blur(images: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    chosen = _coin(images.shape[0], params.blur_prob, generator)
    sigma = _uniform(1, 0.1, 1.5, generator).item()
    if params.blur_prob > 0 and chosen.any():
        index = _chosen_index(chosen, images.device)
        images = images.clone()
        images[index] = TF.gaussian_blur(images[index], kernel_size=[5, 5], sigma=[sigma, sigma])
    return images


def gaussian_noise(images: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    if params.noise_std <= 0:
        return images
    noise = torch.randn(images.shape, generator=device_generator(generator, images.device), device=images.device)
    return images.add_(noise.mul_(params.noise_std * 255.0)).clamp_(0, 255)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """`generator` itself on the CPU; on another device a generator there, seeded from `generator`'s stream
    (drawing a batch-sized tensor on the CPU and copying it would cost more than the whole augmentation)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def trivial_augment(images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """v2.TrivialAugmentWide per image; it draws from torch's global RNG, so run it on a forked RNG
    seeded from our generator (the global stream, which dropout uses, is left untouched)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    transform = v2.TrivialAugmentWide()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(img) for img in images_uint8])


def augment_batch(images_uint8: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """N x C x H x W uint8 on any device -> augmented float32 on the 0..255 scale (same shape, same device).

    `generator` is a CPU generator whatever the device (see the module's docstring)."""
    if params.trivial_augment:
        images_uint8 = trivial_augment(images_uint8, generator)
    images = images_uint8.float()
    theta = _to(affine_theta(params, images.shape[0], generator), images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # reflection: a rotated tile keeps plausible texture in its corners instead of black wedges
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    images = colour_jitter(images, params, generator)
    images = random_blur(images, params, generator)
    return gaussian_noise(images, params, generator)
