"""ShuffleNet V2 (Ma et al. 2018), RepDistiller's CIFAR version (`ShuffleV2`, net size 1x).

1x1 stem (no down-sampling); each stage is a down-sampling unit plus channel-split units;
a final 1x1 conv to 1024 channels. PyTorch's default init, as in the reference. Module
names follow the reference.

Features as its `forward(x, is_feat=True, preact=...)` (RepDistiller models/ShuffleNetv2.py):
f0 = relu(bn1(conv1(x))), f1..f3 the stage outputs, pooled from relu(bn2(conv2(f3))). The
preact of a stage is its last unit's `cat([kept half, bn3 output])` before the ReLU and
*without* the channel shuffle the unit's output gets, exactly as the reference returns it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier
from engine.models.shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Split channels in half; transform one half (1x1, 3x3 depthwise, 1x1); concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def run(self, x: Tensor, keep_pre: bool = False) -> tuple[Tensor, Tensor | None]:
        """(unit output, the unshuffled concatenation before the last ReLU if `keep_pre`)."""
        keep, x = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([keep, F.relu(pre)], 1), 2)
        return out, torch.cat([keep, pre], 1) if keep_pre else None

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]


class DownBlock(nn.Module):
    """Stride-2 unit: both branches see the whole input; their outputs are concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left: 3x3 depthwise (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right: 1x1 -> 3x3 depthwise (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


def run_stage(stage: nn.Sequential, x: Tensor, preact: bool) -> tuple[Tensor, Tensor | None]:
    """(stage output, its last unit's pre-activation map if `preact`); the plain path is stage(x)."""
    if not preact:
        return stage(x), None
    for unit in stage[:-1]:
        x = unit(x)
    return stage[-1].run(x, keep_pre=True)


class ShuffleNetV2(ImageClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        stages = []
        for channels, blocks in zip(out_channels[:3], num_blocks, strict=True):
            units = [DownBlock(in_channels, channels)] + [BasicBlock(channels) for _ in range(blocks)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.feature_dim = out_channels[3]
        self.linear = nn.Linear(self.feature_dim, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, stem, preact)
        f2, p2 = run_stage(self.layer2, f1, preact)
        f3, p3 = run_stage(self.layer3, f2, preact)
        final = F.relu(self.bn2(self.conv2(f3)))
        pooled = self.global_pool(final)
        return Features(
            stem, [f1, f2, f3], pooled, self.linear(pooled), final=final, preact=[p1, p2, p3] if preact else None
        )


def shufflev2(num_classes: int = 10) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes)
