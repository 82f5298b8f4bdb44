"""Starting weights for linear evaluation and fine-tuning: the backbone of a checkpoint.

A kdtui checkpoint's `model` is either a plain zoo model (supervised, RotNet, MixMatch's EMA, a
linear eval) or SimCLR's backbone + projection head, whose backbone keys carry a `backbone.`
prefix. A reference-code weights file (RepDistiller, HSAKD, a bare state dict) is read as a
teacher is (engine/teacher.py read_weights): `[teacher] arch` names its network, the backbone
of an HSAKD `*_aux` file is taken when model.arch is its plain version. Everything but the
classifier is loaded strictly, so a wrong file fails loudly and a different head (10
rotation/pretext classes vs. 100 target classes) does not matter.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from engine.errors import CheckpointError
from engine.models import is_auxiliary
from engine.recipe import Recipe
from engine.teacher import BACKBONE_PREFIX, load_strictly, read_weights


def backbone_checkpoint(recipe: Recipe) -> str:
    """`teacher.checkpoint`, which the launcher fills in from `teacher.from` before a run starts."""
    if not recipe.teacher.checkpoint:
        raise CheckpointError(f"recipe {recipe.run.name!r}: teacher.checkpoint is unresolved; start the run with "
                              "`kdtui run` (which resolves teacher.from) or set teacher.checkpoint")
    return recipe.teacher.checkpoint


def backbone_weights(path: str | Path, source_arch: str | None = None) -> tuple[dict[str, Tensor], str | None]:
    """(state dict of the file's backbone with zoo-model keys, the arch it was trained as);
    `source_arch` is `[teacher] arch`, the network of a reference-code file."""
    weights, checkpoint, arch = read_weights(path, source_arch, role="pretrained backbone")
    if checkpoint is None and arch is not None and is_auxiliary(arch):  # an HSAKD model: backbone + branches
        return _backbone_part(weights), arch.removesuffix("_aux")
    if checkpoint is not None and any(key.startswith(BACKBONE_PREFIX) for key in weights):  # SimCLR, *_aux
        return _backbone_part(weights), arch
    return weights, arch


def _backbone_part(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(BACKBONE_PREFIX): v for k, v in weights.items() if k.startswith(BACKBONE_PREFIX)}


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict names of the model's final classifier (`fc.weight`, `linear.bias`, ...)."""
    owned = {id(p) for p in model.classifier.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in owned}


def load_backbone(model: nn.Module, path: str | Path, arch: str, source_arch: str | None = None) -> None:
    """Load all of `model` but its classifier (left as initialised) from a checkpoint."""
    weights, trained_arch = backbone_weights(path, source_arch)
    if trained_arch != arch:
        raise CheckpointError(f"{path}: its backbone is a {trained_arch!r} but model.arch is {arch!r}; "
                              f"set model.arch = {trained_arch!r}")
    load_strictly(model, weights, path, arch, skip=classifier_keys(model))
