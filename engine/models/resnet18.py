"""ResNets built on torchvision's class, so state-dict keys are torchvision's.

`resnet18` is the CIFAR variant used by SimCLR and most CIFAR benchmarks: 3x3 stride-1 stem,
no max-pool (a 32 px input reaches layer4 at 4x4), 512-d features. `resnet18_imagenet` is
torchvision's network unchanged apart from the classifier, optionally with ImageNet weights.
`resnet50` (engine/models/resnet50.py) is the CIFAR-stem class with bottleneck blocks.

Features as RepDistiller's `forward(x, is_feat=True, preact=...)` (models/resnetv2.py): f0 the
stem's output (after the max-pool where there is one), f1..f4 = layer1..4; preact = each
layer's last block before its final ReLU. The blocks are torchvision's, with `pre_relu` added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights
from torchvision.models import resnet as tv

from engine.models.base import Features, ImageClassifier, run_stage


class BasicBlock(tv.BasicBlock):
    """torchvision's basic block; `pre_relu` is its forward without the last ReLU."""

    def pre_relu(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + (x if self.downsample is None else self.downsample(x))


class Bottleneck(tv.Bottleneck):
    """torchvision's bottleneck (stride on the 3x3 conv); `pre_relu` as above."""

    def pre_relu(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


class TorchvisionResNet(ImageClassifier, tv.ResNet):
    """torchvision's ResNet plus the zoo's feature interface (the same layers, the same order).

    torchvision initialises convs He-normal (fan-out, ReLU) and BN to (1, 0), as RepDistiller's
    resnetv2 does; the CIFAR stem's conv gets the same init.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck] = BasicBlock,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__(block, list(layers), num_classes=num_classes)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.feature_dim = self.fc.in_features

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def compute_features(self, x: Tensor, preact: bool = False) -> Features:
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1, p1 = run_stage(self.layer1, stem, preact)
        f2, p2 = run_stage(self.layer2, f1, preact)
        f3, p3 = run_stage(self.layer3, f2, preact)
        f4, p4 = run_stage(self.layer4, f3, preact)
        pooled = self.global_pool(f4)
        return Features(
            stem, [f1, f2, f3, f4], pooled, self.fc(pooled), final=f4, preact=[p1, p2, p3, p4] if preact else None
        )


def resnet18(num_classes: int = 10) -> TorchvisionResNet:
    return TorchvisionResNet(BasicBlock, (2, 2, 2, 2), num_classes, cifar_stem=True)


def resnet18_imagenet(num_classes: int = 1000, pretrained: bool | str = False) -> TorchvisionResNet:
    """torchvision's ResNet-18 with a fresh `num_classes` classifier.

    pretrained: False (random init); True (torchvision's IMAGENET1K_V1 weights, downloaded into
    the torch hub cache unless already there); or a path to a torchvision resnet18 state dict.
    The ImageNet classifier is never kept: `fc` is always a new layer.
    """
    model = TorchvisionResNet(BasicBlock, (2, 2, 2, 2), 1000)
    if pretrained:
        state = _download_imagenet_weights() if pretrained is True else _load_state_dict(Path(pretrained))
        _load_backbone(model, state)
    model.fc = nn.Linear(model.feature_dim, num_classes)
    return model


def _download_imagenet_weights() -> dict[str, Any]:
    url = ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except OSError as err:  # URLError, HTTPError, timeouts, no route to host
        raise RuntimeError(
            f"could not download the ImageNet weights for resnet18 from {url} ({err}). "
            f"Without internet access, fetch that file elsewhere and put it at {cached}, "
            "or set model.pretrained to the path of a torchvision resnet18 state dict."
        ) from err


def _load_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (expected a torchvision resnet18 state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_backbone(model: nn.Module, state: dict[str, Any]) -> None:
    """Load everything but the classifier, strictly: a wrong file fails loudly, a different head does not."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & given.keys() if getattr(given[k], "shape", None) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            "pretrained weights do not match torchvision's resnet18: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with another shape (e.g. {wrong[:3]})"
        )
    model.load_state_dict(given, strict=False)
