"""ResNet-50 for CIFAR as in RepDistiller/CRD's model zoo (models/resnetv2.py, `ResNet50`).

Bottleneck blocks [3, 4, 6, 3] at widths 64/128/256/512 (x4 expansion), a 3x3 stride-1 stem
with no max-pool (a 32 px input reaches layer4 at 4x4), 2048-d features, the stride on each
block's 3x3 conv, convs initialised He-normal (fan-out, ReLU) and BN to (1, 0), the linear
layer at PyTorch's default. It is built on torchvision's class, so its state-dict keys are
torchvision's (`layer1.0.downsample.0`, `fc`), not the reference's (`shortcut.*`, `linear.*`).
"""

from __future__ import annotations

from engine.models.resnet18 import Bottleneck, TorchvisionResNet


def resnet50(num_classes: int = 10) -> TorchvisionResNet:
    return TorchvisionResNet(Bottleneck, (3, 4, 6, 3), num_classes, cifar_stem=True)
