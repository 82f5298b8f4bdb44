"""ShuffleNet V1 (Zhang et al. 2018), RepDistiller's CIFAR version (`ShuffleV1`, g = 3).

1x1 stem (no down-sampling), three stages of grouped bottlenecks with channel shuffle;
stride-2 units concatenate an average-pooled shortcut instead of adding it. PyTorch's
default init, as in the reference. Module names follow the reference.
Features as its `forward(x, is_feat=True, preact=...)` (RepDistiller models/ShuffleNetv1.py):
f0 = relu(bn1(conv1(x))), f1..f3 the stage outputs; preact = each stage's last unit before its
final ReLU (the residual sum; a stride-2 unit's would be the concatenation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier, run_stage


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """(N, g*c, H, W) -> interleave the groups' channels, so grouped convs see every group."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The first unit sees the 24-channel stem: too few channels to group.
        self.shuffle_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def pre_relu(self, x: Tensor) -> Tensor:
        """The unit's output before its final ReLU (RepDistiller's `preact`)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        return out + x

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_relu(x))


class ShuffleNetV1(ImageClassifier):
    def __init__(
        self,
        num_classes: int = 10,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for planes, blocks in zip(out_planes, num_blocks, strict=True):
            # The stride-2 unit concatenates its input, so its own branch makes the difference.
            units = [Bottleneck(in_planes, planes - in_planes, 2, groups)]
            units += [Bottleneck(planes, planes, 1, groups) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*units))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = out_planes[-1]
        self.linear = nn.Linear(self.feature_dim, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = run_stage(self.layer1, stem, preact)
        f2, p2 = run_stage(self.layer2, f1, preact)
        f3, p3 = run_stage(self.layer3, f2, preact)
        pooled = self.global_pool(f3)
        return Features(
            stem, [f1, f2, f3], pooled, self.linear(pooled), final=f3, preact=[p1, p2, p3] if preact else None
        )


def shufflev1(num_classes: int = 10) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes)
