"""Model definitions for the pruning workflow and the benchmarks.

    from catalyst_fused.models import build_model
    model = build_model("resnet56", num_classes=10)

Names: ``"resnet56"`` and ``"vgg19_bn"`` (CIFAR, 32x32 inputs), ``"resnet50"`` (torchvision's ImageNet
ResNet-50, randomly initialised; torchvision is imported only when it is asked for), ``"small_cnn"``
(8x8 digits), ``"mobilenetv2_cifar"`` (inverted residuals with depthwise convolutions) and ``"vit_cifar"``
(a small torchvision ViT; its ``image_size`` is fixed at construction). See
:mod:`catalyst_fused.models.cifar` and :mod:`catalyst_fused.models.mobile` for the architectures.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

import inspect

from .cifar import VGG19_CFG, BasicBlock, ResNetCIFAR, SmallCNN, VGGCIFAR, resnet56, vgg19_bn
from .mobile import MobileNetV2CIFAR, mobilenetv2_cifar, vit_cifar

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "MobileNetV2CIFAR",
    "ResNetCIFAR",
    "SmallCNN",
    "VGG19_CFG",
    "VGGCIFAR",
    "build_model",
    "mobilenetv2_cifar",
    "resnet50",
    "resnet56",
    "vgg19_bn",
    "vit_cifar",
]


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (``weights=None``: random initialisation, nothing is downloaded).

    With ``in_channels != 3`` the stem convolution is replaced by one with that many input channels.
    """
    import torchvision  # lazy: only this model needs torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride, padding=old.padding, bias=False
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def _small_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


# name -> (constructor, default num_classes, default in_channels)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int, int]] = {
    "resnet56": (resnet56, 10, 3),
    "vgg19_bn": (vgg19_bn, 100, 3),
    "resnet50": (resnet50, 1000, 3),
    "small_cnn": (_small_cnn, 10, 1),
    "mobilenetv2_cifar": (mobilenetv2_cifar, 10, 3),
    "vit_cifar": (vit_cifar, 10, 3),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
                image_size: Optional[int] = None) -> nn.Module:
    """Builds a freshly initialised model by name.

    Args:
        name: one of :data:`MODEL_NAMES` (``"resnet56"``, ``"vgg19_bn"``, ``"resnet50"``, ``"small_cnn"``).
        num_classes: output classes; ``None`` takes the model's default (10 for resnet56 and small_cnn,
            100 for vgg19_bn, 1000 for resnet50).
        in_channels: input channels; ``None`` takes the default (1 for small_cnn, 3 otherwise).
        image_size: the input size, for models built for one size (``vit_cifar``; default 32); the others
            ignore it.

    Raises:
        ValueError: for an unknown name (the message lists the choices) or non-positive sizes.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    constructor, default_classes, default_channels = _REGISTRY[name]
    num_classes = default_classes if num_classes is None else int(num_classes)
    in_channels = default_channels if in_channels is None else int(in_channels)
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}")
    extra = {}
    if image_size is not None and "image_size" in inspect.signature(constructor).parameters:
        extra["image_size"] = int(image_size)
    return constructor(num_classes=num_classes, in_channels=in_channels, **extra)
