"""The feature interface every plain model in the zoo implements.

SSL, linear evaluation, the HSAKD branches and the feature-distillation methods need more than
logits, so each model exposes the same things regardless of family:

    model(x)                          -> logits
    model(x, features=True)           -> Features(stem, stages, pooled, logits, final)
    model(x, features=True, preact=True) also fills Features.preact
    stage_features(x) -> [stage1, stage2, stage3, final map]   (what HSAKD's branches read)
    forward_features(x) -> (B, feature_dim) globally average-pooled final map
    classifier       -> the last nn.Linear

A family implements only `compute_features`; everything above is derived from it here, so the
plain forward and the feature views can never disagree. `features=True` goes through `forward`,
so forward hooks (channels_last inputs), torch.compile and DistributedDataParallel see the call;
methods never reach into a model's layers. `Features.as_list()` is RepDistiller's
`is_feat=True` list (HobbitLong/RepDistiller, models/*.py `forward(x, is_feat, preact)`), so a
method ported from there indexes it the same way: [1:-1] the stage maps, [-2] the last map,
[-1] the pooled vector.

The final layer keeps the attribute name of its reference implementation (`fc` in
RepDistiller's ResNet/WRN and torchvision, `linear` in the ShuffleNets) so their published
checkpoints load with strict=True; `classifier` is then a property pointing at it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Features:
    """One forward pass, opened up: what RepDistiller's `is_feat=True, preact=...` returns, by name.

    `stages` are the outputs of the network's stages as the next stage reads them (f1..fk);
    `preact` holds the same maps before their last activation where the family has one
    (RepDistiller's `preact=True` list; None unless asked for); `final` is the map the global
    pool reads (f_k itself, or f_k after a last BN-ReLU / 1x1 conv).
    """

    stem: Tensor  # f0: the stem's output
    stages: list[Tensor]  # f1..fk
    pooled: Tensor  # (B, feature_dim): the classifier's input
    logits: Tensor
    final: Tensor
    preact: list[Tensor] | None = None

    def as_list(self, preact: bool = False) -> list[Tensor]:
        """[f0, f1, ..., fk, pooled] in RepDistiller's order; pre-activation stage maps if asked."""
        if preact and self.preact is None:
            raise ValueError("pre-activation maps were not computed; call model(x, features=True, preact=True)")
        return [self.stem, *(self.preact if preact else self.stages), self.pooled]


class ImageClassifier(nn.Module):
    """Base class: subclasses define `compute_features`, `feature_dim` and a `classifier`."""

    feature_dim: int
    classifier: nn.Linear

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        """The whole forward pass with every intermediate map kept (see Features).

        With preact=False it must do exactly the work of a plain forward: it *is* the plain forward.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_features")

    def stage_features(self, x: Tensor) -> list[Tensor]:
        """[stage1, stage2, stage3, final map], shallow to deep; the last one is what gets pooled."""
        f = self.compute_features(x)
        return [*f.stages[:3], f.final]

    @staticmethod
    def global_pool(fmap: Tensor) -> Tensor:
        """Global average pool: (B, C, H, W) -> (B, C)."""
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.compute_features(x).pooled

    def forward(self, x: Tensor, features: bool = False, preact: bool = False) -> Tensor | Features:
        if preact and not features:
            raise ValueError("preact=True needs features=True (a plain forward returns only logits)")
        f = self.compute_features(x, preact)
        return f if features else f.logits


def run_stage(stage: nn.Sequential, x: Tensor, preact: bool = False) -> tuple[Tensor, Tensor | None]:
    """(output of a stage of post-activation blocks, its last block's output before the final ReLU).

    Blocks define `pre_relu(x)` with `forward(x) == relu(pre_relu(x))`. Without `preact` the
    blocks run as usual (no extra work, and the second value is None); with it the last block
    runs once, through `pre_relu`, and its ReLU is applied out of place so both maps survive.
    """
    if not preact:
        return stage(x), None
    for block in stage[:-1]:
        x = block(x)
    pre = stage[-1].pre_relu(x)
    return F.relu(pre), pre


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
