"""The feature interface every plain model in the zoo implements.

SSL, linear evaluation and the HSAKD branches need more than logits, so each model
exposes the same four things regardless of family:

    stage_features(x) -> [stage1, stage2, stage3, ..., final map]   (shallow to deep)
    forward_features(x) -> (B, feature_dim) globally average-pooled final map
    classifier       -> the last nn.Linear
    forward(x)       == classifier(forward_features(x))

The final layer keeps the attribute name of its reference implementation (`fc` in
RepDistiller's ResNet/WRN and torchvision, `linear` in the ShuffleNets) so their published
checkpoints load with strict=True; `classifier` is then a property pointing at it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageClassifier(nn.Module):
    """Base class: subclasses define `stage_features`, `feature_dim` and a `classifier`."""

    feature_dim: int
    classifier: nn.Linear

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """Intermediate maps, shallow to deep; the last one is what gets pooled."""
        raise NotImplementedError

    @staticmethod
    def global_pool(fmap: Tensor) -> Tensor:
        """Global average pool: (B, C, H, W) -> (B, C)."""
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.global_pool(self.stage_features(x)[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def init_he_fan_out(module: nn.Module, zero_linear_bias: bool = True) -> None:
    """The CIFAR zoo's init: conv ~ N(0, 2/fan_out) (He, fan-out), BN = (1, 0), linear bias 0.

    RepDistiller's ResNet leaves the linear layer at PyTorch's default (`zero_linear_bias=False`).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None and zero_linear_bias:
            nn.init.zeros_(m.bias)
