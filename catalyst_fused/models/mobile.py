"""Small networks with the structures efficient architectures use, sized for small images on a CPU.

* :class:`MobileNetV2CIFAR` / :func:`mobilenetv2_cifar`: the inverted-residual network of Sandler et al.
  (2018) scaled down for 16-32 pixel inputs: a 3x3 stem (stride 1), inverted residual blocks (1x1
  expansion - BN - ReLU6, 3x3 **depthwise** convolution - BN - ReLU6, 1x1 projection - BN, with an identity
  shortcut where the shape stays), a 1x1 head convolution, global average pooling and a linear classifier.
  Stages ``(expansion t, channels c, blocks n, stride s)``: ``(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2),
  (4, 48, 2, 1)``, head 128 channels: about 60 k parameters.
* :func:`vit_cifar`: torchvision's ``VisionTransformer`` (``nn.MultiheadAttention`` blocks, pre-LayerNorm,
  a class token) with patch 4, 4 layers, 4 heads, width 64, MLP 128, for ``image_size`` x ``image_size``
  inputs (default 32): about 0.2 M parameters.

Both are built with random weights (nothing is downloaded).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2CIFAR", "mobilenetv2_cifar", "vit_cifar", "MOBILENETV2_CIFAR_STAGES"]

MOBILENETV2_CIFAR_STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 2, 1))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when ``expansion == 1``), 3x3 depthwise convolution, 1x1 linear projection; the
    input is added when the block keeps the shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [] if expansion == 1 else [_conv_bn(in_channels, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, out_channels, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2CIFAR(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 stages: Sequence[tuple[int, int, int, int]] = MOBILENETV2_CIFAR_STAGES, stem: int = 16, head: int = 128):
        super().__init__()
        blocks = [_conv_bn(in_channels, stem, 3)]
        channels = stem
        for t, c, n, s in stages:
            for k in range(n):
                blocks.append(InvertedResidual(channels, c, s if k == 0 else 1, t))
                channels = c
        blocks.append(_conv_bn(channels, head, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobilenetv2_cifar(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2CIFAR:
    return MobileNetV2CIFAR(num_classes=num_classes, in_channels=in_channels)


def vit_cifar(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """torchvision's ``VisionTransformer`` for ``image_size`` inputs (a multiple of the patch size 4)."""
    from torchvision.models.vision_transformer import VisionTransformer

    if image_size % 4:
        raise ValueError(f"vit_cifar: image_size must be a multiple of the patch size 4, got {image_size}")
    model = VisionTransformer(image_size=image_size, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=4, stride=4)
    return model
