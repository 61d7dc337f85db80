"""Small-image classification networks used by the pruning workflow and the benchmarks.

* :class:`ResNetCIFAR` / :func:`resnet56`: the CIFAR ResNet of He et al. (2016), section 4.2: a 3x3 stem
  with 16 channels, three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the first block of
  stages 2 and 3 halves the resolution with stride 2), global average pooling and a linear classifier.
  Depth ``6n + 2``; ResNet-56 is ``n = 9``.

  Shortcuts are **option B**: where a block changes the shape (stride 2 and a channel increase) the
  shortcut is a 1x1 convolution with stride 2 followed by BatchNorm; elsewhere it is the identity. (The
  paper's CIFAR models use option A, a parameter-free subsampling with zero-padded channels; option B
  gives every channel a real weight, which is what structured pruning needs.) ResNet-56 therefore has
  57 convolutions (1 stem + 54 in blocks + 2 shortcuts) and about 0.86 M parameters.

* :class:`VGGCIFAR` / :func:`vgg19_bn`: VGG-19 with BatchNorm for 32x32 inputs: 16 3x3 convolutions
  (each followed by BatchNorm and ReLU) in the configuration
  ``64, 64, M, 128, 128, M, 256 x4, M, 512 x4, M, 512 x4, M``, which leaves a 512 x 1 x 1 feature map,
  then a classifier ``Linear(512, 512) - ReLU - Linear(512, num_classes)``. ``num_classes=100``
  (CIFAR-100) by default.

* :class:`SmallCNN`: three conv3x3 - BatchNorm - ReLU layers with 32, 64 and 64 channels, global
  average pooling and a linear layer; meant for the 8x8 scikit-learn digits (``in_channels=1``).

Convolutions have no bias (BatchNorm follows each of them); weights use Kaiming-normal initialisation
(fan-out, ReLU), BatchNorm starts at scale 1 / shift 0.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "ResNetCIFAR",
    "resnet56",
    "VGG19_CFG",
    "VGGCIFAR",
    "vgg19_bn",
    "SmallCNN",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU.

    ``shortcut`` is the identity when the shape is unchanged, else a 1x1 conv (with ``stride``) + BN.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` (option-B shortcuts, see the module docstring).

    Attributes: ``conv1``/``bn1`` (stem), ``layer1``..``layer3`` (``nn.Sequential`` of :class:`BasicBlock`),
    ``avgpool``, ``fc``.
    """

    def __init__(
        self,
        blocks_per_stage: int = 9,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {tuple(widths)}")
        self.blocks_per_stage = blocks_per_stage
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        channels = widths[0]
        stages = []
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride if b == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-56 for 32x32 inputs (3 stages x 9 BasicBlocks, 16/32/64 channels, option-B shortcuts)."""
    return ResNetCIFAR(blocks_per_stage=9, num_classes=num_classes, in_channels=in_channels)


# "M" is a 2x2 max-pool; numbers are conv3x3 output channels.
VGG19_CFG: tuple[Union[int, str], ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)


class VGGCIFAR(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` (conv3x3-BN-ReLU and max-pools from ``cfg``),
    then ``classifier`` = ``Linear(c, hidden) - ReLU - Linear(hidden, num_classes)`` on the flattened
    ``c x 1 x 1`` map (``c`` is the last conv width)."""

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = VGG19_CFG,
        num_classes: int = 100,
        in_channels: int = 3,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        pools = 0
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                pools += 1
            else:
                layers += [_conv3x3(channels, int(v)), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        # 32 / 2**5 = 1: the map is 1x1 for CIFAR; pooling to 1x1 keeps other sizes working too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg19_bn(num_classes: int = 100, in_channels: int = 3) -> VGGCIFAR:
    """VGG-19-BN for CIFAR (16 convs + 2 linear layers; CIFAR-100 head by default)."""
    return VGGCIFAR(VGG19_CFG, num_classes=num_classes, in_channels=in_channels)


class SmallCNN(nn.Module):
    """conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, conv3x3(64)-BN-ReLU, global average pool, linear.

    All convolutions keep the spatial size (padding 1, stride 1), so any input size >= 1x1 works; the
    intended input is the 8x8 digits from ``sklearn.datasets.load_digits`` (``in_channels=1``).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 64)) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 conv widths, got {tuple(widths)}")
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = _conv3x3(widths[0], widths[1])
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.conv3 = _conv3x3(widths[1], widths[2])
        self.bn3 = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
