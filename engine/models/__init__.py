"""The model zoo: `build_model(arch, num_classes)` over the names in `registry.MODELS`.

Importing this package does not import torch (the registry is used by torch-free recipe
validation); the family module is imported when a model is built.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from engine.models.registry import MODELS, is_auxiliary, model_names

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MODELS", "build_model", "count_parameters", "is_auxiliary", "model_names"]


def build_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A freshly initialised `arch` with a `num_classes`-way classifier.

    Plain models implement `engine.models.base.ImageClassifier` (`model(x, features=True)`,
    forward_features, feature_dim, classifier, stage_features); `*_aux` models return
    `(logits, [aux1, aux2, aux3])`, and their backbone's Features with `features=True`.
    Extra keyword options (e.g. `pretrained` for resnet18_imagenet) go to the factory.
    """
    if arch not in MODELS:
        raise KeyError(f"unknown model arch {arch!r}; known: {', '.join(model_names())}")
    module_name, _, factory_name = MODELS[arch].partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    accepted = set(inspect.signature(factory).parameters) - {"num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"model arch {arch!r} does not take option(s) {', '.join(unknown)}"
            f" (it accepts: {', '.join(sorted(accepted)) or 'none'})"
        )
    return factory(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
