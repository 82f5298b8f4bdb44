"""Wide ResNets (Zagoruyko & Komodakis 2016): RepDistiller's CIFAR zoo and MixMatch's WRN-28-2.

Pre-activation basic blocks, depth 6n+4, widths 16 -> 16k/32k/64k. Module names follow the
reference (`block1.layer.0.convShortcut`, `fc`, ...), so its checkpoints load.

`wrn_28_2` is MixMatch's network (1,467,610 parameters for 10 classes, the same count as the
generic definition): leaky-ReLU 0.1, BN momentum 0.001 (TensorFlow's decay 0.999), and the
shortcut of a width-changing block reads the *raw* input except in the first group, as in the
TensorFlow original (google-research/mixmatch, libml/models.py). The popular PyTorch port
instead feeds those blocks' first conv with the raw input and uses BN momentum 0.999 (which,
in PyTorch's convention, nearly discards the running statistics); we follow the original.

Features as RepDistiller's `forward(x, is_feat=True, preact=...)` (models/wrn.py): f0 the stem
conv's output, f1..f3 the groups' outputs (raw residual sums: the blocks are pre-activation),
pooled from relu(bn1(f3)). Its preact list replaces f1, f2, f3 by the BN that next reads them:
block2.layer[0].bn1(f1), block3.layer[0].bn1(f2) and bn1(f3) (its `get_bn_before_relu`). The
reference applies those BNs a second time, which in training mode updates their running
statistics twice; here each is the very BN output the forward pass computes anyway.
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier, init_he_fan_out


def _activation(leaky_slope: float) -> nn.Module:
    return nn.LeakyReLU(leaky_slope, inplace=True) if leaky_slope else nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    """BN-act-conv-BN-act-conv; a 1x1 projection shortcut where the width changes.

    `activated_shortcut`: whether that projection reads the activated input (RepDistiller,
    always; MixMatch, only in the first group) or the raw one.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        leaky_slope: float = 0.0,
        bn_momentum: float = 0.1,
        activated_shortcut: bool = True,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.relu1 = _activation(leaky_slope)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.relu2 = _activation(leaky_slope)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.activated_shortcut = activated_shortcut
        self.convShortcut: nn.Conv2d | None = None  # reference checkpoint key
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def run(self, x: Tensor, keep_norm: bool = False) -> tuple[Tensor, Tensor | None]:
        """(block output, bn1(x) if `keep_norm`): bn1(x) is the pre-activation map RepDistiller
        reads. It is copied before relu1 overwrites it in place; the plain path copies nothing."""
        normed = self.bn1(x)
        kept = normed.clone() if keep_norm else None
        act = self.relu1(normed)
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        if self.convShortcut is None:
            return x + out, kept
        return self.convShortcut(act if self.activated_shortcut else x) + out, kept

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]


class NetworkBlock(nn.Module):
    """A group of `n` blocks; only the first changes width/stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, **block_kwargs: float | bool) -> None:
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride, **block_kwargs)]
        blocks += [BasicBlock(out_planes, out_planes, 1, **block_kwargs) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def run(self, x: Tensor, keep_norm: bool = False) -> tuple[Tensor, Tensor | None]:
        """(group output, the first block's bn1(x) if `keep_norm`)."""
        if not keep_norm:
            return self.layer(x), None
        x, normed = self.layer[0].run(x, keep_norm=True)
        for block in self.layer[1:]:
            x = block(x)
        return x, normed

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ImageClassifier):
    """3x3 stem + three groups (strides 1, 2, 2) + BN-act + global pool + fc."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        leaky_slope: float = 0.0,
        bn_momentum: float = 0.1,
        mixmatch_shortcuts: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 28, 40, ...), got {depth}")
        self.depth, self.widen_factor = depth, widen_factor
        self.blocks_per_stage = n = (depth - 4) // 6
        self.widths = w = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        common = dict(leaky_slope=leaky_slope, bn_momentum=bn_momentum)
        self.conv1 = nn.Conv2d(3, w[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1, **common)
        self.block2 = NetworkBlock(n, w[1], w[2], 2, activated_shortcut=not mixmatch_shortcuts, **common)
        self.block3 = NetworkBlock(n, w[2], w[3], 2, activated_shortcut=not mixmatch_shortcuts, **common)
        self.bn1 = nn.BatchNorm2d(w[3], momentum=bn_momentum)
        self.relu = _activation(leaky_slope)
        self.feature_dim = w[3]
        self.fc = nn.Linear(w[3], num_classes)
        init_he_fan_out(self)
        if mixmatch_shortcuts:  # MixMatch initialises the classifier Glorot-normal
            nn.init.xavier_normal_(self.fc.weight)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = self.conv1(x)
        f1 = self.block1(stem)
        f2, p1 = self.block2.run(f1, keep_norm=preact)  # p1 = block2.layer[0].bn1(f1)
        f3, p2 = self.block3.run(f2, keep_norm=preact)  # p2 = block3.layer[0].bn1(f2)
        # Group outputs are pre-activation sums; the pooled map is the final BN-act of f3.
        normed = self.bn1(f3)
        p3 = normed.clone() if preact else None  # self.relu works in place
        final = self.relu(normed)
        pooled = self.global_pool(final)
        return Features(
            stem, [f1, f2, f3], pooled, self.fc(pooled), final=final, preact=[p1, p2, p3] if preact else None
        )


def wrn_16_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 2, num_classes)


def wrn_28_2(num_classes: int = 10) -> WideResNet:
    """MixMatch's WRN-28-2 (see the module docstring for how it differs)."""
    return WideResNet(28, 2, num_classes, leaky_slope=0.1, bn_momentum=0.001, mixmatch_shortcuts=True)
