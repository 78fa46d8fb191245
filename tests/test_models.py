"""Backbones, preprocessing, the model.pt contract, the decoded-image cache and augmentation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lensmith import datacache
from lensmith.augment import augment_batch
from lensmith.datacache import cache_path, cached_images
from lensmith.errors import LensmithError, ParamsError
from lensmith.modelio import ModelFileError, load_trained, save_trained, state_dict_sha256
from lensmith.models import (
    MODEL_NAMES,
    ModelError,
    backbone_parameters,
    build_model,
    head_parameters,
    lite0_weights_file,
    preprocessing_for,
    torchvision_weights_path,
)
from lensmith.params import AugmentParams, params_from_dict


def smallest_size(name: str) -> int:
    return 224 if name == "vit_b_16" else 32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_backbone_builds_with_a_new_head_and_splits_head_from_backbone(name: str) -> None:
    size = smallest_size(name)
    model = build_model(name, num_classes=3, pretrained=False, dropout=0.1, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 3)
    head = {id(p) for p in head_parameters(model)}
    backbone = {id(p) for p in backbone_parameters(model)}
    assert head and backbone and not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in head_parameters(model)) < 10_000  # a Linear to 3 classes, nothing more


def test_lite0_pretrained_loads_the_packaged_imagenet_weights() -> None:
    model = build_model("efficientnet_lite0", 4, pretrained=True, dropout=0.2, image_size=64)
    packaged = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["_conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(model.state_dict()["_conv_head.weight"], packaged["_conv_head.weight"])
    assert model._fc.out_features == 4
    assert all(type(m).__name__ != "MemoryEfficientSwish" for m in model.modules())  # set_swish() never called


def test_preprocessing_is_the_backbones_own() -> None:
    lite = preprocessing_for("efficientnet_lite0", 96)
    assert lite.channels == "RGB" and lite.image_size == 96
    x = lite.normalize(np.full((1, 3, 1, 1), 255, dtype=np.uint8))
    assert np.allclose(x, (255 - 127) / 128, atol=1e-6)
    tv = preprocessing_for("resnet18", 64)
    assert tv.mean == (0.485, 0.456, 0.406) and tv.std == (0.229, 0.224, 0.225)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet9000'.*efficientnet_lite0"):
        build_model("resnet9000", 3, pretrained=False, dropout=0.0)
    with pytest.raises(ParamsError, match="train.model"):
        params_from_dict({"train": {"model": "resnet9000"}})


@pytest.mark.parametrize(("name", "size", "match"), [("resnet18", 16, "too small"), ("vit_b_16", 128, "exactly 224")])
def test_image_size_the_backbone_cannot_take_is_a_clear_error(name: str, size: int, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        preprocessing_for(name, size)
    with pytest.raises(LensmithError, match=match):
        build_model(name, 3, pretrained=False, dropout=0.0, image_size=size)


def test_torchvision_pretrained_reads_the_local_hub_cache_and_names_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match=r"resnet18-f37072fd\.pth") as info:
        build_model("resnet18", 3, pretrained=True, dropout=0.0, image_size=32)
    assert str(tmp_path / "checkpoints") in str(info.value)

    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path, _ = torchvision_weights_path("resnet18")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 3, pretrained=True, dropout=0.0, image_size=32)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_save_and_load_trained_round_trip(tmp_path: Path) -> None:
    model = build_model("efficientnet_lite0", 3, pretrained=False, dropout=0.2, image_size=32).eval()
    prep = preprocessing_for("efficientnet_lite0", 32)
    save_trained(tmp_path / "m", model, arch="efficientnet_lite0", classes=["a", "b", "c"], preprocessing=prep, meta={"x": 1})
    loaded = load_trained(tmp_path / "m")
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocessing == prep and loaded.meta["x"] == 1
    assert not loaded.model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert state_dict_sha256(model.state_dict()) == state_dict_sha256(loaded.model.state_dict())
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert set(payload) == {"arch", "num_classes", "classes", "preprocessing", "state_dict"}


def test_load_trained_missing_or_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no trained model"):
        load_trained(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="not a readable lensmith model"):
        load_trained(tmp_path)


def write_images(folder: Path, n: int, size: int = 40) -> tuple[list[Path], list[str]]:
    rng = np.random.default_rng(0)
    files, hashes = [], []
    for i in range(n):
        path = folder / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(path)
        files.append(path)
        hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return files, hashes


def test_image_cache_matches_preprocessing_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, hashes = write_images(tmp_path / "img", 5)
    prep = preprocessing_for("efficientnet_lite0", 32)
    images = cached_images(files, hashes, prep, tmp_path / "cache")
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.uint8
    expected = prep.to_uint8(Image.open(files[3])).transpose(2, 0, 1)
    assert np.array_equal(images[3], expected)
    assert cache_path(tmp_path / "cache", hashes, prep).is_file()

    def no_decoding(*args: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(datacache, "decode_to_uint8", no_decoding)
    assert np.array_equal(cached_images(files, hashes, prep, tmp_path / "cache"), images)
    assert cache_path(tmp_path / "cache", hashes, preprocessing_for("efficientnet_lite0", 64)) != cache_path(
        tmp_path / "cache", hashes, prep
    )


def test_augmentation_is_reproducible_from_its_generator() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    params = AugmentParams(hue=0.05, blur_prob=0.5, trivial_augment=True)
    a = augment_batch(images, params, torch.Generator().manual_seed(1))
    b = augment_batch(images, params, torch.Generator().manual_seed(1))
    c = augment_batch(images, params, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 255


def test_global_rng_is_untouched_by_augmentation() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    augment_batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), AugmentParams(trivial_augment=True), torch.Generator())
    assert torch.equal(torch.rand(3), expected)


def test_augmentation_switched_off_is_the_identity() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    off = AugmentParams(
        hflip=False, vflip=False, rotation_degrees=0, crop_scale=(1.0, 1.0), brightness=0, contrast=0,
        saturation=0, hue=0, blur_prob=0, noise_std=0,
    )
    out = augment_batch(images, off, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float(), atol=1e-3)
    flips = AugmentParams(**{**off.model_dump(), "hflip": True})
    flipped = augment_batch(images, flips, torch.Generator().manual_seed(0))
    for original, result in zip(images.float(), flipped):
        assert torch.allclose(result, original, atol=1e-3) or torch.allclose(result, original.flip(-1), atol=1e-3)
