"""VGG with batch norm for CIFAR, as in RepDistiller (the ImageNet FC stack replaced by one linear).

Five conv blocks; max-pool after blocks 0-2 (and 3 for 64 px inputs), so a 32 px input
ends at 4x4 with 512 channels, globally average-pooled. Module names follow the reference.
Features as its `forward(x, is_feat=True, preact=...)` (RepDistiller models/vgg.py): f0 =
relu(block0(x)) before the first pool, f1..f4 the ReLU outputs of blocks 1-4; the preact list
has each block's output before that ReLU instead (f4 included; f0 is the same in both).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.base import Features, ImageClassifier

# Output channels of each conv, per block (RepDistiller's configs S, A and B).
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _conv_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the last ReLU (the network applies it, keeping the pre-ReLU
    output available to feature-distillation methods)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class VGG(ImageClassifier):
    def __init__(self, cfg: list[list[int]], num_classes: int = 10) -> None:
        super().__init__()
        in_channels = [3] + [block[-1] for block in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _conv_block(c, i) for c, i in zip(cfg, in_channels, strict=True)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.feature_dim = cfg[-1][-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        size = x.shape[2]
        stem = F.relu(self.block0(x))
        p1 = self.block1(self.maxpool(stem))
        f1 = F.relu(p1)  # out of place: the pre-ReLU map stays intact at no extra cost
        p2 = self.block2(self.maxpool(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.maxpool(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.maxpool(f3) if size == 64 else f3)
        f4 = F.relu(p4)
        pooled = self.global_pool(f4)
        return Features(
            stem,
            [f1, f2, f3, f4],
            pooled,
            self.classifier(pooled),
            final=f4,
            preact=[p1, p2, p3, p4] if preact else None,
        )


def vgg8(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 10) -> VGG:
    return VGG(CONFIGS["vgg13"], num_classes)
