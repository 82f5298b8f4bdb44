"""Architecture names -> "module:factory", resolved lazily.

Torch-free on purpose: recipe validation imports this to check `model.arch` without
paying for `import torch`. `engine.models.build_model` does the actual import.
"""

from __future__ import annotations

MODELS: dict[str, str] = {
    # CIFAR ResNets (RepDistiller / CRD model zoo)
    "resnet8": "engine.models.resnet:resnet8",
    "resnet14": "engine.models.resnet:resnet14",
    "resnet20": "engine.models.resnet:resnet20",
    "resnet32": "engine.models.resnet:resnet32",
    "resnet44": "engine.models.resnet:resnet44",
    "resnet56": "engine.models.resnet:resnet56",
    "resnet110": "engine.models.resnet:resnet110",
    "resnet8x4": "engine.models.resnet:resnet8x4",
    "resnet32x4": "engine.models.resnet:resnet32x4",
    # Wide ResNets (RepDistiller) and MixMatch's WRN-28-2
    "wrn_16_1": "engine.models.wrn:wrn_16_1",
    "wrn_16_2": "engine.models.wrn:wrn_16_2",
    "wrn_40_1": "engine.models.wrn:wrn_40_1",
    "wrn_40_2": "engine.models.wrn:wrn_40_2",
    "wrn_28_2": "engine.models.wrn:wrn_28_2",
    # VGG with batch norm (RepDistiller)
    "vgg8": "engine.models.vgg:vgg8",
    "vgg11": "engine.models.vgg:vgg11",
    "vgg13": "engine.models.vgg:vgg13",
    # mobile networks (RepDistiller's CIFAR versions)
    "mobilenetv2": "engine.models.mobilenetv2:mobilenetv2",
    "shufflev1": "engine.models.shufflenetv1:shufflev1",
    "shufflev2": "engine.models.shufflenetv2:shufflev2",
    # ResNet-18: CIFAR stem (SimCLR) and torchvision's ImageNet one
    "resnet18": "engine.models.resnet18:resnet18",
    "resnet18_imagenet": "engine.models.resnet18:resnet18_imagenet",
    # ResNet-50 with the CIFAR stem (RepDistiller's resnetv2 ResNet50, torchvision key names)
    "resnet50": "engine.models.resnet50:resnet50",
    # HSAKD auxiliary-branch variants: forward(x) -> (logits, [aux1, aux2, aux3])
    "resnet8_aux": "engine.models.auxiliary:resnet8_aux",
    "resnet14_aux": "engine.models.auxiliary:resnet14_aux",
    "resnet20_aux": "engine.models.auxiliary:resnet20_aux",
    "resnet32_aux": "engine.models.auxiliary:resnet32_aux",
    "resnet44_aux": "engine.models.auxiliary:resnet44_aux",
    "resnet56_aux": "engine.models.auxiliary:resnet56_aux",
    "resnet110_aux": "engine.models.auxiliary:resnet110_aux",
    "resnet8x4_aux": "engine.models.auxiliary:resnet8x4_aux",
    "resnet32x4_aux": "engine.models.auxiliary:resnet32x4_aux",
    "wrn_16_1_aux": "engine.models.auxiliary:wrn_16_1_aux",
    "wrn_16_2_aux": "engine.models.auxiliary:wrn_16_2_aux",
    "wrn_40_1_aux": "engine.models.auxiliary:wrn_40_1_aux",
    "wrn_40_2_aux": "engine.models.auxiliary:wrn_40_2_aux",
}


def model_names() -> list[str]:
    """Registered architecture names, grouped by family (registry order)."""
    return list(MODELS)


def is_auxiliary(arch: str) -> bool:
    """True for HSAKD variants, whose forward returns (logits, [aux logits x3])."""
    return arch.endswith("_aux")
