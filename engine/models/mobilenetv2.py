"""MobileNetV2 (Sandler et al. 2018), RepDistiller's CIFAR version (`mobile_half`).

Expansion 6, width multiplier 0.5, a stride-2 stem, so a 32 px input ends at 2x2 with 1280
channels. RepDistiller wraps the final linear in a one-element Sequential (`classifier.0.*`);
HSAKD does not (`classifier.*`). Both checkpoint layouts load here.

Features as the reference's `forward(x, is_feat=True, preact=...)` (RepDistiller
models/mobilenetv2.py): f0 the stem's output, f1..f4 the outputs of block groups 1, 2, 4 and 6
(linear bottlenecks: no ReLU to undo), pooled after the last 1x1 conv. The reference ignores
`preact`, so the preact list is the same maps.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier, init_he_fan_out


def conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# The block groups whose outputs are RepDistiller's f1..f4.
_FEATURE_GROUPS = (1, 2, 4, 6)


class MobileNetV2(ImageClassifier):
    def __init__(self, num_classes: int = 10, expansion: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        # (expansion, channels, repeats, first stride) per group of blocks
        setting = [
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            out = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*group))
        self.feature_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, self.feature_dim, 1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        init_he_fan_out(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        self.register_load_state_dict_pre_hook(_accept_repdistiller_keys)

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = x = self.conv1(x)
        stages = []
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in _FEATURE_GROUPS:
                stages.append(x)
        final = self.conv2(x)
        pooled = self.global_pool(final)
        return Features(
            stem, stages, pooled, self.classifier(pooled), final=final, preact=list(stages) if preact else None
        )


def _accept_repdistiller_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Rename RepDistiller's `classifier.0.*` to `classifier.*` before loading."""
    for name in ("weight", "bias"):
        old = f"{prefix}classifier.0.{name}"
        if old in state_dict:
            state_dict[f"{prefix}classifier.{name}"] = state_dict.pop(old)


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes)
