"""Frozen networks read from checkpoints: distillation teachers and pretrained backbones.

A teacher is rebuilt from what its checkpoint says about itself (`arch`, `num_classes`,
`dataset`, `class_names`), never from the student's recipe, and refused with one line if it
was trained on other classes than the data it is asked to teach. It is kept out of the
student's checkpoints (the recipe names it, so a resumed run reloads it) and is frozen for
good: eval() mode, no gradients, and forward passes under inference_mode (no autograd
bookkeeping; in the caller's autocast precision), so its weights and BN running statistics
cannot move.

A weights file of the reference code (RepDistiller, HSAKD, mdistiller, a bare state dict; see
engine/checkpoint.py load_weights) says none of that about itself. `[teacher] arch` names its
network (required, never guessed), that arch's table translates its parameter names
(engine/models/reference_layouts.py), its number of classes is the row count of its classifier's
weight (there are no class names to compare), and the weights are then loaded strictly.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.checkpoint import load_weights
from engine.data import DataBundle
from engine.errors import CheckpointError
from engine.models import build_model, is_auxiliary, model_names
from engine.models.auxiliary import AuxiliaryModel
from engine.models.base import Features
from engine.models.reference_layouts import LayoutError, to_kdtui_names

BACKBONE_PREFIX = "backbone."


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


def read_weights(path: str | Path, arch: str | None,
                 role: str = "teacher") -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """(state dict in kdtui's names, the kdtui checkpoint or None, the arch it holds).

    `arch` is `[teacher] arch`: required for a reference-code file, optional (and then checked)
    for a kdtui checkpoint, which names its own."""
    weights, checkpoint = load_weights(path, map_location="cpu")
    if checkpoint is not None:
        trained = checkpoint.get("arch")
        if arch is not None and trained != arch:
            raise CheckpointError(f"{path}: this kdtui checkpoint holds a {trained!r} but [teacher] arch = {arch!r}; "
                                  "drop teacher.arch (kdtui checkpoints name their own) or fix it")
        return weights, checkpoint, trained
    if arch is None:
        raise CheckpointError(f"{path}: not a kdtui checkpoint, so nothing says which network the {role} is; "
                              'set [teacher] arch to its kdtui name (e.g. arch = "wrn_40_2")')
    try:
        return to_kdtui_names(weights, arch), None, arch
    except LayoutError as err:
        raise CheckpointError(f"{path}: {err}") from None


def classifier_key(model: nn.Module) -> str:
    """State-dict name of the main classifier's weight (`fc.weight`, `backbone.fc.weight`, ...)."""
    head = model.backbone.classifier if isinstance(model, AuxiliaryModel) else model.classifier
    return next(name for name, p in model.named_parameters() if p is head.weight)


def check_classes(model: nn.Module, weights: dict[str, Any], path: str | Path, data: DataBundle,
                  role: str = "teacher") -> None:
    """A reference-code file names no classes: its classifier must have one row per class of the data."""
    key = classifier_key(model)
    value = weights.get(key)
    rows = value.shape[0] if isinstance(value, Tensor) and value.dim() == 2 else None
    if rows is not None and rows != data.num_classes:
        raise CheckpointError(f"{path}: {role} has {rows} classes ({key} has {rows} rows) but this run's data set "
                              f"is {data.name} ({data.num_classes} classes); use a {role} trained on {data.name}")


def load_strictly(model: nn.Module, weights: dict[str, Any], path: str | Path, arch: str,
                  skip: Collection[str] = ()) -> None:
    """Every parameter and buffer of `model` but `skip` (a new head) from `weights`, or one line
    naming a few of the keys that did not fit."""
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    given = {k: v for k, v in weights.items() if k not in skip}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    reshaped = [f"{k} {tuple(getattr(given[k], 'shape', ()))} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in given and getattr(given[k], "shape", None) != v.shape]
    if missing or unexpected or reshaped:
        found = [f"{len(keys)} {what} {keys[:3]}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs arch)", reshaped))
                 if keys]
        raise CheckpointError(f"{path}: weights do not fit arch {arch!r}: {'; '.join(found)}")
    model.load_state_dict(given, strict=not skip)


def freeze(model: nn.Module) -> nn.Module:
    """eval() mode and requires_grad=False on every parameter."""
    model.eval()
    model.requires_grad_(False)
    return model


class Teacher:
    """A frozen network from a checkpoint. Deliberately not an nn.Module: it never becomes a
    submodule of the student, so it is neither trained, nor saved, nor switched to train()."""

    def __init__(self, path: str | Path, data: DataBundle, device: torch.device, arch: str | None = None) -> None:
        """`arch`: `[teacher] arch`, the network of a reference-code file (see the module docstring)."""
        weights, checkpoint, trained = read_weights(path, arch)
        if checkpoint is not None:
            check_compatible(checkpoint, path, data)
        self.path, self.arch = str(path), str(trained)
        self.auxiliary = is_auxiliary(self.arch)
        model = build_model(self.arch, int(checkpoint["num_classes"]) if checkpoint is not None else data.num_classes)
        if checkpoint is None:
            check_classes(model, weights, path, data)
        load_strictly(model, weights, path, self.arch)
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


def load_backbone(backbone: nn.Module, arch: str, path: str | Path, data: DataBundle,
                  source_arch: str | None = None) -> None:
    """Load a pretrained plain `arch` (or the backbone of an `arch`_aux) checkpoint into `backbone`;
    `source_arch` is `[teacher] arch`, the network of a reference-code file."""
    weights, checkpoint, trained = read_weights(path, source_arch, role="pretrained backbone")
    if checkpoint is not None:
        check_compatible(checkpoint, path, data, role="pretrained backbone")
    if trained == f"{arch}_aux":
        weights = {k.removeprefix(BACKBONE_PREFIX): v for k, v in weights.items() if k.startswith(BACKBONE_PREFIX)}
    elif trained != arch:
        raise CheckpointError(f"{path}: pretrained backbone is {trained!r}, expected {arch!r} "
                              f"(or {arch + '_aux'!r})")
    if checkpoint is None:
        check_classes(backbone, weights, path, data, role="pretrained backbone")
    load_strictly(backbone, weights, path, arch)
