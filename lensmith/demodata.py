"""The embedded demo dataset: a seeded, offline "tile inspection" set (`lensmith demo-data`).

Surfaces are cut from scikit-image's bundled CC0 / public-domain textures (brick, gravel, grass,
moon), tinted as tile materials; defects are drawn with numpy: `crack` (dark branching random
walk with tapering width), `scratch` (long thin line, dark core beside a bright specular ridge),
`stain` (soft irregular blob of rust/oil/water colour shift), `pitting` (cluster of small dark
pits with bright rims), and `ok` (no defect). Every image is then lit (brightness, colour
temperature, illumination gradient, glare), blurred and given sensor noise by its site, lighting
and camera.

Groups: every `batch` is one physical tile crop photographed 5-10 times (same material, same
class, different defect instances), so a split that ignores batches leaks near-copies.

Sites A and B are the training sites; C is held back for drift demos: darker, warmer light,
strong glare, more blur, another camera.

Determinism: each image draws from its own generator seeded with (seed, site, class, index) and
each batch from (seed, site, class, batch), so the bytes do not depend on worker count or order.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from lensmith.errors import DataError
from lensmith.fsutil import atomic_dir
from lensmith.packing import pack_images
from lensmith.procutil import pool_executor

CLASSES: tuple[str, ...] = ("ok", "crack", "scratch", "stain", "pitting")
TRAINING_SITES: tuple[str, ...] = ("A", "B")
ALL_SITES: tuple[str, ...] = ("A", "B", "C")
METADATA_COLUMNS: tuple[str, ...] = ("path", "label", "site", "lighting", "camera", "batch")
JPEG_QUALITY = 92
BATCH_SIZE_RANGE = (5, 10)

# name -> (texture strength range); all bundled with scikit-image, no download (pooch) needed.
TEXTURES: dict[str, tuple[float, float]] = {
    "brick": (0.25, 0.55),
    "gravel": (0.2, 0.5),
    "grass": (0.1, 0.22),
    "moon": (0.15, 0.35),
}

# Tile materials: base reflectance (RGB).
MATERIALS: dict[str, tuple[float, float, float]] = {
    "ceramic_white": (0.86, 0.85, 0.82),
    "beige_stone": (0.78, 0.70, 0.58),
    "terracotta": (0.74, 0.46, 0.33),
    "slate": (0.46, 0.49, 0.52),
    "sandstone": (0.82, 0.71, 0.53),
    "concrete": (0.64, 0.63, 0.60),
    "sage_glaze": (0.62, 0.70, 0.60),
}

# Lighting -> white-balance gains (colour temperature) applied to the scene.
LIGHTING_GAINS: dict[str, tuple[float, float, float]] = {
    "daylight": (1.0, 1.0, 1.0),
    "led_cool": (0.90, 0.98, 1.10),
    "fluorescent": (0.95, 1.05, 0.94),
    "halogen_warm": (1.16, 0.97, 0.72),
    "sodium_dim": (1.24, 0.93, 0.56),
}

# camera -> (sensor noise std, extra blur sigma in px at 128)
CAMERAS: dict[str, tuple[float, float]] = {
    "cam1": (0.008, 0.0),
    "cam2": (0.014, 0.25),
    "cam3": (0.022, 0.4),
}


@dataclass(frozen=True)
class SiteProfile:
    lightings: dict[str, float]
    cameras: dict[str, float]
    brightness: tuple[float, float]
    glare: tuple[float, float]
    glare_sigma: tuple[float, float]
    blur: tuple[float, float]
    gradient: tuple[float, float]


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile(
        lightings={"daylight": 0.5, "led_cool": 0.5},
        cameras={"cam1": 0.6, "cam2": 0.4},
        brightness=(0.82, 1.08),
        glare=(0.0, 0.3),
        glare_sigma=(12.0, 35.0),
        blur=(0.0, 0.7),
        gradient=(0.0, 0.25),
    ),
    "B": SiteProfile(
        lightings={"led_cool": 0.4, "fluorescent": 0.4, "daylight": 0.2},
        cameras={"cam1": 0.3, "cam2": 0.7},
        brightness=(0.78, 1.05),
        glare=(0.0, 0.35),
        glare_sigma=(12.0, 35.0),
        blur=(0.0, 0.8),
        gradient=(0.0, 0.3),
    ),
    "C": SiteProfile(
        lightings={"halogen_warm": 0.6, "sodium_dim": 0.4},
        cameras={"cam3": 1.0},
        brightness=(0.45, 0.68),
        glare=(0.45, 0.95),
        glare_sigma=(20.0, 45.0),
        blur=(0.3, 1.1),
        gradient=(0.2, 0.5),
    ),
}


@dataclass
class DemoSummary:
    out: Path
    sites: list[str]
    seed: int
    image_size: int
    counts: dict[str, int] = field(default_factory=dict)  # per class
    site_counts: dict[str, int] = field(default_factory=dict)
    n_batches: int = 0
    seconds: float = 0.0
    shards: bool = False

    @property
    def n_images(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        per_class = ", ".join(f"{label} {n}" for label, n in self.counts.items())
        return (
            f"demo data: {self.n_images} images ({per_class}) from site(s) {','.join(self.sites)} in "
            f"{self.n_batches} batches, {self.image_size}x{self.image_size}, seed {self.seed} -> {self.out} "
            f"(+ metadata.csv{', packed into shards' if self.shards else ''}) in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class ImageJob:
    site: str
    label: str
    index: int
    batch: int

    @property
    def relpath(self) -> str:
        return f"{self.label}/{self.site}_{self.label}_{self.index:05d}.jpg"


# ---------------------------------------------------------------- seeding and planning


def rng_for(seed: int, kind: int, site: str, label: str, number: int = 0) -> np.random.Generator:
    """Independent generator per (seed, kind, site, class, number): order/worker independent."""
    key = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, kind, ALL_SITES.index(site), CLASSES.index(label), number]
    return np.random.default_rng(key)


_KIND_IMAGE, _KIND_BATCH, _KIND_BATCH_SIZES = 0, 1, 2


def batch_sizes(seed: int, site: str, label: str, n_images: int) -> list[int]:
    """Sizes (5-10) of the production batches that hold `n_images` images of one class at one site."""
    rng = rng_for(seed, _KIND_BATCH_SIZES, site, label)
    lo, hi = BATCH_SIZE_RANGE
    sizes: list[int] = []
    while sum(sizes) < n_images:
        sizes.append(int(rng.integers(lo, hi + 1)))
    sizes[-1] -= sum(sizes) - n_images
    if len(sizes) > 1 and sizes[-1] < lo:  # fold a short tail batch into the previous one
        tail = sizes.pop()
        sizes[-1] += tail
    return sizes


def batch_id(seed: int, site: str, label: str, batch: int) -> str:
    """Opaque production-batch id (does not reveal the class), unique per seed/site/class/batch."""
    digest = hashlib.sha256(f"{seed}/{site}/{label}/{batch}".encode()).hexdigest()[:8]
    return f"{site}-{digest}"


def images_per_site(per_class: int, sites: Sequence[str]) -> dict[str, int]:
    """`per_class` images of each class, spread evenly over the sites (remainder to the first)."""
    base, extra = divmod(per_class, len(sites))
    return {site: base + (1 if i < extra else 0) for i, site in enumerate(sites)}


def plan_jobs(seed: int, sites: Sequence[str], per_class: int) -> list[ImageJob]:
    jobs = []
    for site, n_images in images_per_site(per_class, sites).items():
        for label in CLASSES:
            index = 0
            for batch, size in enumerate(batch_sizes(seed, site, label, n_images)):
                for _ in range(size):
                    jobs.append(ImageJob(site, label, index, batch))
                    index += 1
    return jobs


def choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


# ---------------------------------------------------------------- surfaces


@lru_cache(maxsize=None)
def texture_detail(name: str) -> np.ndarray:
    """Bundled scikit-image texture as zero-mean, unit-std float32 detail (cached per process)."""
    import skimage.data

    pixels = getattr(skimage.data, name)().astype(np.float32)
    return (pixels - pixels.mean()) / pixels.std()


@dataclass(frozen=True)
class TileBatch:
    """One physical tile: the material crop every image of the batch is photographed from."""

    texture: str
    strength: float
    smoothing: float
    colour: tuple[float, float, float]
    centre: tuple[float, float]
    side: float
    rot90: int
    flip: bool


def tile_batch(rng: np.random.Generator) -> TileBatch:
    texture = str(rng.choice(list(TEXTURES)))
    material = MATERIALS[str(rng.choice(list(MATERIALS)))]
    colour = tuple(float(np.clip(c * rng.uniform(0.92, 1.08), 0.05, 0.95)) for c in material)
    side = float(rng.uniform(150, 300))
    size = texture_detail(texture).shape[0]
    margin = side * 0.7
    return TileBatch(
        texture=texture,
        strength=float(rng.uniform(*TEXTURES[texture])),
        smoothing=float(rng.choice([0.0, 0.0, 0.6, 1.2])),
        colour=colour,  # type: ignore[arg-type]
        centre=(float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin))),
        side=side,
        rot90=int(rng.integers(0, 4)),
        flip=bool(rng.integers(0, 2)),
    )


def surface(batch: TileBatch, rng: np.random.Generator, size: int) -> np.ndarray:
    """Reflectance (size, size, 3) of this shot of the batch's tile: same crop, slightly moved."""
    detail = texture_detail(batch.texture)
    side = batch.side * rng.uniform(0.92, 1.08)
    cy = batch.centre[0] + rng.uniform(-0.12, 0.12) * batch.side
    cx = batch.centre[1] + rng.uniform(-0.12, 0.12) * batch.side
    limit = detail.shape[0]
    y0 = int(np.clip(cy - side / 2, 0, limit - side))
    x0 = int(np.clip(cx - side / 2, 0, limit - side))
    crop = detail[y0 : y0 + int(side), x0 : x0 + int(side)]
    patch = np.asarray(Image.fromarray(crop, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    if batch.smoothing:
        patch = gaussian_filter(patch, batch.smoothing)
    patch = np.rot90(patch, batch.rot90)
    if batch.flip:
        patch = patch[:, ::-1]
    shade = 1.0 + batch.strength * np.clip(patch, -2.0, 2.0)
    colour = np.asarray(batch.colour, dtype=np.float32)
    return np.clip(shade[..., None] * colour, 0.02, 1.0).astype(np.float32)


# ---------------------------------------------------------------- drawing primitives


def densify(vertices: np.ndarray, radii: np.ndarray, spacing: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Resample a polyline (N, 2) and its per-vertex radii every `spacing` px."""
    seg = np.diff(vertices, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    if cum[-1] == 0:
        return vertices[:1], radii[:1]
    t = np.arange(0.0, cum[-1], spacing)
    points = np.stack([np.interp(t, cum, vertices[:, 0]), np.interp(t, cum, vertices[:, 1])], axis=1)
    return points, np.interp(t, cum, radii)


def stroke_mask(shape: tuple[int, int], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (0..1) of discs of `radii` centred at `points` (y, x), all discs at once."""
    mask = np.zeros(shape, dtype=np.float32)
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float32), len(points))
    if not len(points):
        return mask
    reach = int(np.ceil(radii.max() + 1.5))
    offsets = np.arange(-reach, reach + 1)
    base = np.floor(points).astype(np.int64)
    ys = base[:, 0, None, None] + offsets[None, :, None]
    xs = base[:, 1, None, None] + offsets[None, None, :]
    distance = np.sqrt((ys - points[:, 0, None, None]) ** 2 + (xs - points[:, 1, None, None]) ** 2)
    cover = np.clip(radii[:, None, None] + 0.5 - distance, 0.0, 1.0)
    keep = (cover > 0) & (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
    np.maximum.at(mask, (np.broadcast_to(ys, keep.shape)[keep], np.broadcast_to(xs, keep.shape)[keep]), cover[keep])
    return mask


def random_walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float, step: float) -> np.ndarray:
    """Jagged path: direction wanders a little each step (crack propagation)."""
    n = max(int(length / step), 2)
    turns = rng.normal(0.0, 0.35, n) + rng.normal(0.0, 0.04)
    angles = angle + np.cumsum(turns) * 0.6
    steps = np.stack([np.sin(angles), np.cos(angles)], axis=1) * step
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def low_frequency_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------- defects
# Each draws into `refl` (reflectance, multiplicative) and `spec` (specular light, additive).


def draw_crack(refl: np.ndarray, spec: np.ndarray, rng: np.random.Generator, s: float) -> None:
    size = refl.shape[0]
    start = rng.uniform(0.25, 0.75, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(0.8, 1.8) * s
    mask = np.zeros(refl.shape[:2], dtype=np.float32)
    arms = []
    for direction in (angle, angle + np.pi + rng.normal(0, 0.3)):
        path = random_walk(rng, start, direction, rng.uniform(0.2, 0.5) * size, 2.0 * s)
        taper = np.linspace(width, 0.3 * s, len(path))
        arms.append((path, taper))
    for path, taper in list(arms):
        for _ in range(int(rng.integers(0, 3))):
            k = int(rng.integers(1, len(path) - 1))
            heading = np.arctan2(*(path[k] - path[k - 1]))
            branch = random_walk(rng, path[k], heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1),
                                 rng.uniform(0.08, 0.25) * size, 1.6 * s)
            arms.append((branch, np.linspace(taper[k] * 0.7, 0.25 * s, len(branch))))
    for path, taper in arms:
        points, radii = densify(path, taper)
        np.maximum(mask, stroke_mask(mask.shape, points, radii), out=mask)
    depth = rng.uniform(0.5, 0.85)
    shadow = gaussian_filter(mask, 1.2 * s)
    refl *= (1.0 - depth * np.clip(mask + 0.35 * shadow, 0, 1))[..., None]


def draw_scratch(refl: np.ndarray, spec: np.ndarray, rng: np.random.Generator, s: float) -> None:
    size = refl.shape[0]
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.3, 0.7, 2) * size
    for n in range(1 if rng.random() < 0.7 else 2):
        length = rng.uniform(0.6, 1.3) * size
        direction = np.array([np.sin(angle), np.cos(angle)])
        normal = np.array([-direction[1], direction[0]])
        offset = centre + normal * n * rng.uniform(4, 10) * s
        t = np.linspace(-0.5, 0.5, 24)[:, None]
        bow = rng.uniform(-0.06, 0.06) * length * (1 - 4 * t**2)
        path = offset + t * length * direction + bow * normal
        radius = rng.uniform(0.45, 0.9) * s
        fade = np.clip(np.minimum(t[:, 0] + 0.5, 0.5 - t[:, 0]) * 12, 0.3, 1.0)  # thinner at the ends
        points, radii = densify(path, radius * fade)
        core = stroke_mask(refl.shape[:2], points, radii)
        side = rng.choice([-1.0, 1.0])
        ridge = stroke_mask(refl.shape[:2], points + side * normal * (radius + 0.9 * s), radii * 0.8)
        refl *= (1.0 - rng.uniform(0.3, 0.6) * core)[..., None]
        spec += rng.uniform(0.3, 0.65) * ridge * (1.0 - core)
        angle += rng.normal(0, 0.05)


STAIN_TINTS: dict[str, tuple[float, float, float]] = {
    "rust": (0.95, 0.55, 0.30),
    "oil": (0.50, 0.50, 0.58),
    "water": (0.62, 0.64, 0.67),
}


def draw_stain(refl: np.ndarray, spec: np.ndarray, rng: np.random.Generator, s: float) -> None:
    size = refl.shape[0]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(theta, rng.uniform(11, 30) * s)
    for k in range(2, 6):
        radius *= 1.0 + rng.uniform(0, 0.28) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    distance = np.hypot(yy - cy, xx - cx)
    edge = rng.uniform(2.5, 7.0) * s
    blob = np.clip((radius - distance) / edge + 0.5, 0.0, 1.0)
    blob *= np.clip(0.75 + 0.25 * low_frequency_noise(rng, size, 10), 0.3, 1.0)
    kind = str(rng.choice(list(STAIN_TINTS)))
    tint = np.asarray(STAIN_TINTS[kind], dtype=np.float32)
    strength = rng.uniform(0.55, 0.9)
    refl *= 1.0 - strength * blob[..., None] * (1.0 - tint)
    if kind == "water":  # tide mark: darker rim where the drop dried
        rim = blob * (1.0 - blob) * 4.0
        refl *= (1.0 - 0.22 * rim)[..., None]
    elif kind == "oil":  # thin-film sheen
        spec += 0.12 * blob * np.clip(low_frequency_noise(rng, size, 14), 0, None)


def draw_pitting(refl: np.ndarray, spec: np.ndarray, rng: np.random.Generator, s: float) -> None:
    size = refl.shape[0]
    centre = rng.uniform(0.25, 0.75, 2) * size
    n = int(rng.integers(6, 26))
    spread = rng.uniform(5, 15) * s
    points = centre + rng.normal(0, 1, (n, 2)) * spread
    radii = rng.uniform(1.0, 2.3, n) * s
    pits = stroke_mask(refl.shape[:2], points, radii)
    light = np.array([-0.8, -0.8]) * s  # rims catch light from the top left
    rims = np.clip(stroke_mask(refl.shape[:2], points + light, radii + 1.0 * s) - pits, 0, 1)
    refl *= (1.0 - rng.uniform(0.6, 0.9) * pits)[..., None]
    spec += rng.uniform(0.3, 0.55) * rims


def draw_dust(refl: np.ndarray, rng: np.random.Generator, s: float) -> None:
    """Benign specks on every class, so that 'a small mark' alone does not mean a defect."""
    size = refl.shape[0]
    n = int(rng.integers(0, 5))
    if n == 0:
        return
    specks = stroke_mask(refl.shape[:2], rng.uniform(0, size, (n, 2)), rng.uniform(0.4, 0.9, n) * s)
    refl *= (1.0 + rng.uniform(-0.15, 0.15) * specks)[..., None]


DEFECTS = {"crack": draw_crack, "scratch": draw_scratch, "stain": draw_stain, "pitting": draw_pitting}


# ---------------------------------------------------------------- lighting and camera


@lru_cache(maxsize=8)
def centred_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [-0.5, 0.5) as float32 (y, x); cached, treat as read-only."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) / size) - 0.5
    return yy, xx


def light_and_capture(
    refl: np.ndarray, spec: np.ndarray, rng: np.random.Generator, site: str, lighting: str, camera: str, s: float
) -> np.ndarray:
    """Scene -> uint8 photo: brightness, colour temperature, gradient, glare, blur, noise."""
    profile = SITES[site]
    size = refl.shape[0]
    yy, xx = centred_grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    illumination = 1.0 + rng.uniform(*profile.gradient) * (np.cos(angle) * xx + np.sin(angle) * yy) * 2
    illumination -= rng.uniform(0.0, 0.35) * (xx**2 + yy**2)  # vignetting
    gains = np.asarray(LIGHTING_GAINS[lighting], dtype=np.float32) * rng.uniform(0.97, 1.03, 3)
    brightness = rng.uniform(*profile.brightness)
    lamp = gains / gains.max()
    gy, gx = rng.uniform(-0.4, 0.4, 2)
    sigma = rng.uniform(*profile.glare_sigma) / size
    glare = rng.uniform(*profile.glare) * np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * sigma**2))
    image = refl * (illumination * brightness)[..., None] * gains + (spec * brightness + glare)[..., None] * lamp
    noise_std, camera_blur = CAMERAS[camera]
    blur = np.hypot(rng.uniform(*profile.blur) if rng.random() < 0.7 else 0.0, camera_blur) * s
    if blur > 0.05:
        image = gaussian_filter(image, sigma=(blur, blur, 0))
    image += noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_image(job: ImageJob, seed: int, image_size: int) -> tuple[np.ndarray, dict[str, str]]:
    """Pixels and metadata of one image; a pure function of (job, seed, image_size)."""
    batch = tile_batch(rng_for(seed, _KIND_BATCH, job.site, job.label, job.batch))
    rng = rng_for(seed, _KIND_IMAGE, job.site, job.label, job.index)
    profile = SITES[job.site]
    lighting = choose(rng, profile.lightings)
    camera = choose(rng, profile.cameras)
    s = image_size / 128.0
    refl = surface(batch, rng, image_size)
    spec = np.zeros(refl.shape[:2], dtype=np.float32)
    draw_dust(refl, rng, s)
    if job.label in DEFECTS:
        DEFECTS[job.label](refl, spec, rng, s)
    pixels = light_and_capture(refl, spec, rng, job.site, lighting, camera, s)
    meta = {
        "path": job.relpath,
        "label": job.label,
        "site": job.site,
        "lighting": lighting,
        "camera": camera,
        "batch": batch_id(seed, job.site, job.label, job.batch),
    }
    return pixels, meta


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def render_chunk(out: Path, seed: int, image_size: int, jobs: Sequence[ImageJob]) -> list[dict[str, str]]:
    """Render and write a chunk of images under `out`; returns their metadata rows (worker entry point)."""
    rows = []
    for job in jobs:
        pixels, meta = render_image(job, seed, image_size)
        (out / job.relpath).write_bytes(jpeg_bytes(pixels))
        rows.append(meta)
    return rows


# ---------------------------------------------------------------- orchestration


def resolve_workers(workers: int) -> int:
    if workers > 0:
        return workers
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def chunked(jobs: Sequence[ImageJob], size: int) -> Iterable[Sequence[ImageJob]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def render_all(out: Path, seed: int, image_size: int, jobs: Sequence[ImageJob], workers: int) -> list[dict[str, str]]:
    """Render every job into `out` with a progress bar; in-process when workers == 1."""
    rows: list[dict[str, str]] = []
    progress = tqdm(total=len(jobs), desc="demo-data", unit="img", mininterval=0.5)
    chunk_size = max(8, min(64, len(jobs) // (workers * 8) or 8))
    with progress:
        if workers == 1:
            for chunk in chunked(jobs, chunk_size):
                rows.extend(render_chunk(out, seed, image_size, chunk))
                progress.update(len(chunk))
            return rows
        # spawn: safe even when the caller already runs threads (torch, prefect); threads inside a Dask worker
        with pool_executor(workers, get_context("spawn")) as pool:
            futures = {
                pool.submit(render_chunk, out, seed, image_size, chunk): len(chunk)
                for chunk in chunked(jobs, chunk_size)
            }
            for future in as_completed(futures):
                rows.extend(future.result())
                progress.update(futures[future])
    return rows


def normalise_sites(sites: Sequence[str] | None) -> list[str]:
    if not sites:
        return list(TRAINING_SITES)
    chosen = [str(site).strip().upper() for site in sites]
    unknown = sorted(set(chosen) - set(ALL_SITES))
    if unknown:
        raise DataError(f"unknown demo site(s) {', '.join(unknown)}; choose from {', '.join(ALL_SITES)}")
    return list(dict.fromkeys(chosen))


def write_image_folder(out: Path, seed: int, image_size: int, jobs: Sequence[ImageJob], workers: int) -> pd.DataFrame:
    """Render `jobs` into the existing folder `out` (<class>/<file>.jpg + metadata.csv); return the metadata."""
    for label in CLASSES:
        (out / label).mkdir()
    rows = render_all(out, seed, image_size, jobs, workers)
    metadata = pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).sort_values("path", ignore_index=True)
    metadata.to_csv(out / "metadata.csv", index=False, lineterminator="\n")
    return metadata


def generate_demo_dataset(
    out: Path,
    *,
    sites: list[str] | None,
    seed: int,
    per_class: int,
    image_size: int,
    workers: int = 0,
    shards: bool = False,
) -> DemoSummary:
    """Write the demo set to `out/<class>/<file>.jpg` + `out/metadata.csv` (replacing `out` only on success);
    with `shards`, `out` holds the same images packed into tar shards (lensmith.shards) instead.

    `per_class` images of each class are spread over the sites (default: the training sites A, B).
    Identical bytes for the same (sites, seed, per_class, image_size), whatever `workers` is.
    """
    if per_class < 1:
        raise DataError(f"per_class must be >= 1, got {per_class}")
    if image_size < 32:
        raise DataError(f"image_size must be >= 32, got {image_size}")
    chosen = normalise_sites(sites)
    start = time.perf_counter()
    jobs = plan_jobs(seed, chosen, per_class)
    workers = min(resolve_workers(workers), max(len(jobs) // 8, 1))
    out = Path(out)
    with atomic_dir(out, fsync_files=False) as tmp:  # generated images: regenerated, not fsynced one by one
        if shards:
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.images.", dir=out.parent) as images:
                metadata = write_image_folder(Path(images), seed, image_size, jobs, workers)
                pack_images(Path(images), tmp, extensions=[".jpg"])
        else:
            metadata = write_image_folder(tmp, seed, image_size, jobs, workers)
    counts = metadata["label"].value_counts()
    return DemoSummary(
        out=out,
        sites=chosen,
        seed=seed,
        image_size=image_size,
        counts={label: int(counts.get(label, 0)) for label in CLASSES},
        site_counts={site: int(n) for site, n in metadata["site"].value_counts().sort_index().items()},
        n_batches=int(metadata["batch"].nunique()),
        seconds=time.perf_counter() - start,
        shards=shards,
    )
