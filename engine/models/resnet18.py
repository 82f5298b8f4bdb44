"""ResNet-18 built on torchvision's class, so state-dict keys are torchvision's.

`resnet18` is the CIFAR variant used by SimCLR and most CIFAR benchmarks: 3x3 stride-1 stem,
no max-pool (a 32 px input reaches layer4 at 4x4), 512-d features. `resnet18_imagenet` is
torchvision's network unchanged apart from the classifier, optionally with ImageNet weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from engine.models.base import ImageClassifier


class TorchvisionResNet18(ImageClassifier, ResNet):
    """torchvision's ResNet-18 plus the zoo's feature interface (forward is the same function)."""

    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.feature_dim = 512

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def stage_features(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3, self.layer4(f3)]


def resnet18(num_classes: int = 10) -> TorchvisionResNet18:
    return TorchvisionResNet18(num_classes, cifar_stem=True)


def resnet18_imagenet(num_classes: int = 1000, pretrained: bool | str = False) -> TorchvisionResNet18:
    """torchvision's ResNet-18 with a fresh `num_classes` classifier.

    pretrained: False (random init); True (torchvision's IMAGENET1K_V1 weights, downloaded into
    the torch hub cache unless already there); or a path to a torchvision resnet18 state dict.
    The ImageNet classifier is never kept: `fc` is always a new layer.
    """
    model = TorchvisionResNet18(1000)
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
