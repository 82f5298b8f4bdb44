"""The reference networks, written here from the architecture descriptions of the reference code.

HobbitLong/RepDistiller models/resnet.py, resnetv2.py, wrn.py, vgg.py, mobilenetv2.py,
ShuffleNetv1.py, ShuffleNetv2.py and winycg/HSAKD models/resnet.py, wrn.py (the `_aux` branches):
the same parameter names and shapes, and the same computation, implemented independently of
engine/models so that tests/test_reference_checkpoints.py can check kdtui against them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

BN = nn.BatchNorm2d


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


class Reference(nn.Module):
    """forward = classifier(pooled(x)); `head` is the classifier's attribute name in the reference,
    `stages(x)` are what HSAKD's branches read."""

    head = "fc"

    def pooled(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.head)(self.pooled(x))


# ---------------------------------------------------------------- RepDistiller models/resnet.py


class CifarBasic(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut), `downsample` = 1x1 conv + BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), BN(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), BN(cout)
        self.downsample = nn.Sequential(conv(cin, cout, 1, stride), BN(cout)) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def cifar_stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(CifarBasic(cin, cout, stride), *[CifarBasic(cout, cout, 1) for _ in range(n - 1)])


class CifarResNet(Reference):
    def __init__(self, depth: int, w: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, w[0], 3), BN(w[0])
        self.layer1, self.layer2, self.layer3 = (cifar_stage(w[i], w[i + 1], n, 1 if i == 0 else 2) for i in range(3))
        self.fc = nn.Linear(w[3], num_classes)
        self.widths, self.n = w, n

    def stages(self, x: Tensor) -> list[Tensor]:
        f1 = self.layer1(F.relu(self.bn1(self.conv1(x))))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]

    def pooled(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.stages(x)[-1], 8).flatten(1)


# ---------------------------------------------------------------- RepDistiller models/resnetv2.py


class V2Block(nn.Module):
    """BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3 strided, 1x1 to 4x); `shortcut` Sequential."""

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.bottleneck, out = bottleneck, planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = conv(cin, planes, 1), BN(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, stride), BN(planes)
            self.conv3, self.bn3 = conv(planes, out, 1), BN(out)
        else:
            self.conv1, self.bn1 = conv(cin, planes, 3, stride), BN(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3), BN(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != out:
            self.shortcut = nn.Sequential(conv(cin, out, 1, stride), BN(out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out))) if self.bottleneck else self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(Reference):
    head = "linear"

    def __init__(self, bottleneck: bool, blocks: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        expansion, cin = 4 if bottleneck else 1, 64
        self.conv1, self.bn1 = conv(3, 64, 3), BN(64)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            units = []
            for j in range(n):
                units.append(V2Block(cin, planes, (1 if i == 0 else 2) if j == 0 else 1, bottleneck))
                cin = planes * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(512 * expansion, num_classes)

    def pooled(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ---------------------------------------------------------------- RepDistiller models/wrn.py


class WRNBlock(nn.Module):
    """Pre-activation: BN-ReLU-conv3x3-BN-ReLU-conv3x3; `convShortcut` reads the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = BN(cin), conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = BN(cout), conv(cout, cout, 3)
        self.convShortcut = conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WRNGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WRN(Reference):
    def __init__(self, depth: int, k: int, num_classes: int) -> None:
        super().__init__()
        n, w = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = conv(3, 16, 3)
        self.block1, self.block2, self.block3 = (WRNGroup(n, w[i], w[i + 1], 1 if i == 0 else 2) for i in range(3))
        self.bn1, self.fc = BN(w[3]), nn.Linear(w[3], num_classes)
        self.widths, self.n = w, n

    def stages(self, x: Tensor) -> list[Tensor]:
        f1 = self.block1(self.conv1(x))
        f2 = self.block2(f1)
        return [f1, f2, self.block3(f2)]

    def pooled(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(F.relu(self.bn1(self.stages(x)[-1])), 8).flatten(1)


# ---------------------------------------------------------------- RepDistiller models/vgg.py (vgg*_bn)


class VGG(Reference):
    head = "classifier"

    def __init__(self, cfg: list[list[int]], num_classes: int) -> None:
        super().__init__()
        cin = 3
        for i, block in enumerate(cfg):
            layers: list[nn.Module] = []
            for cout in block:
                layers += [conv(cin, cout, 3, bias=True), BN(cout), nn.ReLU()]
                cin = cout
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))  # the block ends before its last ReLU
        self.classifier = nn.Linear(512, num_classes)

    def pooled(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block4(F.relu(self.block3(x))))  # no pool3 at 32 px
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


VGG_CFG = {"vgg8": [[64], [128], [256], [512], [512]], "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
           "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


# ---------------------------------------------------------------- RepDistiller models/mobilenetv2.py (mobile_half)


def conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, k, stride), BN(cout), nn.ReLU())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hid, self.residual = cin * t, stride == 1 and cin == cout
        self.conv = nn.Sequential(conv(cin, hid, 1), BN(hid), nn.ReLU(), conv(hid, hid, 3, stride, groups=hid), BN(hid),
                                  nn.ReLU(), conv(hid, cout, 1), BN(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileHalf(Reference):
    """T = 6, width 0.5, stride-2 stem; the classifier is a one-element Sequential."""

    head = "classifier"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1)]
        cin, self.conv1, self.blocks = 16, conv_bn(3, 16, 3, 2), nn.ModuleList()
        for t, c, n, s in setting:
            group = []
            for i in range(n):
                group.append(InvertedResidual(cin, c // 2, s if i == 0 else 1, t))
                cin = c // 2
            self.blocks.append(nn.Sequential(*group))
        self.conv2 = conv_bn(cin, 1280, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def pooled(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return F.avg_pool2d(self.conv2(x), 2, ceil_mode=True).flatten(1)


# ---------------------------------------------------------------- RepDistiller ShuffleNetv1.py / ShuffleNetv2.py


def shuffle(x: Tensor, g: int) -> Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int = 3) -> None:
        super().__init__()
        mid, self.g, self.stride = cout // 4, 1 if cin == 24 else groups, stride
        self.conv1, self.bn1 = conv(cin, mid, 1, groups=self.g), BN(mid)
        self.conv2, self.bn2 = conv(mid, mid, 3, stride, groups=mid), BN(mid)
        self.conv3, self.bn3 = conv(mid, cout, 1, groups=groups), BN(cout)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn2(self.conv2(shuffle(F.relu(self.bn1(self.conv1(x))), self.g))))
        out = self.bn3(self.conv3(out))
        return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x)


class ShuffleV1(Reference):
    head = "linear"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.bn1, cin = conv(3, 24, 1), BN(24), 24
        for i, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4), strict=True)):
            units = [ShuffleUnit(cin, planes - cin, 2)] + [ShuffleUnit(planes, planes, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
            cin = planes
        self.linear = nn.Linear(960, num_classes)

    def pooled(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(x, 4).flatten(1)


class SplitUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.conv1, self.bn1 = conv(h, h, 1), BN(h)
        self.conv2, self.bn2 = conv(h, h, 3, groups=h), BN(h)
        self.conv3, self.bn3 = conv(h, h, 1), BN(h)

    def forward(self, x: Tensor) -> Tensor:
        keep, rest = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(rest))))))))
        return shuffle(torch.cat([keep, out], 1), 2)


class DownUnit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv(cin, cin, 3, 2, groups=cin), BN(cin)
        self.conv2, self.bn2 = conv(cin, mid, 1), BN(mid)
        self.conv3, self.bn3 = conv(cin, mid, 1), BN(mid)
        self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), BN(mid)
        self.conv5, self.bn5 = conv(mid, mid, 1), BN(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(Reference):
    head = "linear"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.bn1, cin = conv(3, 24, 1), BN(24), 24
        for i, (c, n) in enumerate(zip((116, 232, 464), (3, 7, 3), strict=True)):
            setattr(self, f"layer{i + 1}", nn.Sequential(DownUnit(cin, c), *[SplitUnit(c) for _ in range(n)]))
            cin = c
        self.conv2, self.bn2 = conv(464, 1024, 1), BN(1024)
        self.linear = nn.Linear(1024, num_classes)

    def pooled(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)


# ---------------------------------------------------------------- HSAKD ResNet_Auxiliary / WideResNet_Auxiliary


class Branches(nn.Module):
    def __init__(self, net: CifarResNet | WRN, num_outputs: int) -> None:
        super().__init__()
        w, n, wrn = net.widths, net.n, isinstance(net, WRN)
        stage: Callable[..., nn.Module] = (lambda a, b, s: WRNGroup(n, a, b, s)) if wrn else (
            lambda a, b, s: cifar_stage(a, b, n, s))
        self.block_extractor1 = nn.Sequential(stage(w[1], w[2], 2), stage(w[2], w[3], 2))
        self.block_extractor2 = nn.Sequential(stage(w[2], w[3], 2))
        self.block_extractor3 = nn.Sequential(stage(w[3], w[3], 1))
        for i in (1, 2, 3):
            if wrn:
                setattr(self, f"bn{i}", BN(w[3]))
            setattr(self, f"fc{i}", nn.Linear(w[3], num_outputs))
        self.wrn = wrn

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = []
        for i, f in enumerate(feats, start=1):
            f = getattr(self, f"block_extractor{i}")(f)
            f = F.relu(getattr(self, f"bn{i}")(f)) if self.wrn else f
            out.append(getattr(self, f"fc{i}")(F.adaptive_avg_pool2d(f, 1).flatten(1)))
        return out


class Auxiliary(nn.Module):
    def __init__(self, backbone: CifarResNet | WRN, num_classes: int) -> None:
        super().__init__()
        self.backbone, self.auxiliary_classifier = backbone, Branches(backbone, 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.backbone(x), self.auxiliary_classifier(self.backbone.stages(x))


THIN, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
PLAIN: dict[str, Callable[[int], nn.Module]] = {
    **{f"resnet{d}": (lambda c, d=d: CifarResNet(d, THIN, c)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda c: CifarResNet(8, WIDE, c), "resnet32x4": lambda c: CifarResNet(32, WIDE, c),
    **{f"wrn_{d}_{k}": (lambda c, d=d, k=k: WRN(d, k, c)) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 2))},
    **{name: (lambda c, cfg=cfg: VGG(cfg, c)) for name, cfg in VGG_CFG.items()},
    "mobilenetv2": MobileHalf, "shufflev1": ShuffleV1, "shufflev2": ShuffleV2,
    "resnet18": lambda c: ResNetV2(False, (2, 2, 2, 2), c), "resnet50": lambda c: ResNetV2(True, (3, 4, 6, 3), c),
    "resnet18_imagenet": lambda c: torchvision.models.resnet18(num_classes=c),  # the reference is torchvision
}  # wrn_28_2 (MixMatch) shares the generic WRN's names; its forward differs, so only names are compared
WITH_BRANCHES = [*(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110, "8x4", "32x4")),
                 "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]  # HSAKD's *_aux families
REFERENCES: dict[str, Callable[[int], nn.Module]] = {
    **PLAIN, **{f"{a}_aux": (lambda c, a=a: Auxiliary(PLAIN[a](c), c)) for a in WITH_BRANCHES}}
