"""Frozen networks read from kdtui checkpoints: distillation teachers and pretrained backbones.

A teacher is rebuilt from what its checkpoint says about itself (`arch`, `num_classes`,
`dataset`, `class_names`), never from the student's recipe, and refused with one line if it
was trained on other classes than the data it is asked to teach. It is kept out of the
student's checkpoints (the recipe names it, so a resumed run reloads it) and is frozen for
good: eval() mode, no gradients, and forward passes under inference_mode (no autograd
bookkeeping; in the caller's autocast precision), so its weights and BN running statistics
cannot move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.checkpoint import load_checkpoint
from engine.data import DataBundle
from engine.errors import CheckpointError
from engine.models import build_model, is_auxiliary, model_names
from engine.models.base import Features


def check_compatible(state: dict[str, Any], path: str | Path, data: DataBundle, role: str = "teacher") -> None:
    """Refuse a checkpoint whose classes are not the data set's classes (one-line CheckpointError)."""
    arch, classes, dataset = state.get("arch"), state.get("num_classes"), state.get("dataset")
    if arch not in model_names():
        raise CheckpointError(f"{path}: {role} checkpoint has unknown arch {arch!r}")
    if classes != data.num_classes or (dataset is not None and dataset != data.name):
        raise CheckpointError(
            f"{path}: {role} was trained on {dataset} ({classes} classes) but this run's data set is "
            f"{data.name} ({data.num_classes} classes); use a {role} trained on {data.name}")
    names = state.get("class_names")
    if names is not None and list(names) != list(data.class_names):
        raise CheckpointError(f"{path}: {role}'s class names differ from {data.name}'s "
                              f"(first: {list(names)[:3]} vs {list(data.class_names)[:3]})")


def freeze(model: nn.Module) -> nn.Module:
    """eval() mode and requires_grad=False on every parameter."""
    model.eval()
    model.requires_grad_(False)
    return model


class Teacher:
    """A frozen network from a checkpoint. Deliberately not an nn.Module: it never becomes a
    submodule of the student, so it is neither trained, nor saved, nor switched to train()."""

    def __init__(self, path: str | Path, data: DataBundle, device: torch.device) -> None:
        state = load_checkpoint(path, map_location="cpu")
        check_compatible(state, path, data)
        self.path, self.arch = str(path), str(state["arch"])
        self.auxiliary = is_auxiliary(self.arch)
        model = build_model(self.arch, int(state["num_classes"]))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise CheckpointError(f"{path}: weights do not fit arch {self.arch!r}: {first}") from None
        self.model = freeze(model.to(device))

    def logits(self, x: Tensor) -> Tensor:
        """Main-head class logits (an `_aux` teacher runs its backbone only)."""
        self.model.eval()
        with torch.inference_mode():
            out = (self.model.backbone if self.auxiliary else self.model)(x)
        return out.clone()  # inference tensors cannot be saved for backward; a loss may need to

    def features(self, x: Tensor, preact: bool = False) -> Features:
        """Every intermediate map of the plain network (an `_aux` teacher's backbone). Under no_grad
        rather than inference_mode: the maps enter the student's loss graph as constants, uncloned."""
        self.model.eval()
        with torch.no_grad():
            return (self.model.backbone if self.auxiliary else self.model)(x, features=True, preact=preact)

    def logits_and_aux(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(main logits, [branch joint logits]) of an `_aux` teacher."""
        if not self.auxiliary:
            raise CheckpointError(f"{self.path}: teacher arch {self.arch!r} has no auxiliary branches; "
                                  "hsakd needs an *_aux teacher (train one with method hsakd_teacher)")
        self.model.eval()
        with torch.inference_mode():
            main, aux = self.model(x)
        return main.clone(), [a.clone() for a in aux]


def load_backbone(backbone: nn.Module, arch: str, path: str | Path, data: DataBundle) -> None:
    """Load a pretrained plain `arch` (or the backbone of an `arch`_aux) checkpoint into `backbone`."""
    state = load_checkpoint(path, map_location="cpu")
    check_compatible(state, path, data, role="pretrained backbone")
    weights = state["model"]
    if state["arch"] == f"{arch}_aux":
        weights = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    elif state["arch"] != arch:
        raise CheckpointError(f"{path}: pretrained backbone is {state['arch']!r}, expected {arch!r} "
                              f"(or {arch + '_aux'!r})")
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit arch {arch!r}: {str(err).splitlines()[0]}") from None
