"""CIFAR ResNets as defined in RepDistiller/CRD's model zoo (He et al. 2016, 6n+2 layers).

Three stages of basic blocks at 32, 16 and 8 px. `resnetNx4` variants widen the stages
to 64/128/256 (stem 32). Module names follow the reference, so its checkpoints load.
Features as the reference's `forward(x, is_feat=True, preact=...)` (models/resnet.py): f0 the
stem's ReLU output, f1..f3 the stage outputs; preact = each stage's last block before its ReLU.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier, init_he_fan_out, run_stage


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # A 1x1 projection only where the shape changes (option B of the paper).
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def pre_relu(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU (RepDistiller's `preact`)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_relu(x))


def make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage: `blocks` basic blocks, the first one changes stride/width."""
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(ImageClassifier):
    """3x3 stem (no pooling) + three stages at strides 1, 2, 2 + global pool + fc."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        self.depth, self.widths = depth, widths
        self.blocks_per_stage = n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer(widths[0], widths[1], n, stride=1)
        self.layer2 = make_layer(widths[1], widths[2], n, stride=2)
        self.layer3 = make_layer(widths[2], widths[3], n, stride=2)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_he_fan_out(self, zero_linear_bias=False)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, stem, preact)
        f2, p2 = run_stage(self.layer2, f1, preact)
        f3, p3 = run_stage(self.layer3, f2, preact)
        pooled = self.global_pool(f3)  # the last stage's output is pooled as is
        return Features(stem, [f1, f2, f3], pooled, self.fc(pooled), final=f3, preact=[p1, p2, p3] if preact else None)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, _THIN, num_classes)


def resnet14(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(14, _THIN, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, _THIN, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, _THIN, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, _THIN, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, _THIN, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, _THIN, num_classes)


def resnet8x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
