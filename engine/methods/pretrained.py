"""Starting weights for linear evaluation and fine-tuning: the backbone of any kdtui checkpoint.

A checkpoint's `model` is either a plain zoo model (supervised, RotNet, MixMatch's EMA, a linear
eval) or SimCLR's backbone + projection head, whose backbone keys carry a `backbone.` prefix.
Everything but the classifier is loaded strictly, so a wrong file fails loudly and a
different head (10 rotation/pretext classes vs. 100 target classes) does not matter.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from engine.checkpoint import load_checkpoint
from engine.errors import CheckpointError
from engine.recipe import Recipe

BACKBONE_PREFIX = "backbone."


def backbone_checkpoint(recipe: Recipe) -> str:
    """`teacher.checkpoint`, which the launcher fills in from `teacher.from` before a run starts."""
    if not recipe.teacher.checkpoint:
        raise CheckpointError(f"recipe {recipe.run.name!r}: teacher.checkpoint is unresolved; start the run with "
                              "`kdtui run` (which resolves teacher.from) or set teacher.checkpoint")
    return recipe.teacher.checkpoint


def backbone_weights(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """(state dict of the checkpoint's backbone with zoo-model keys, the arch it was trained as)."""
    state = load_checkpoint(path)
    weights = state["model"]
    if any(key.startswith(BACKBONE_PREFIX) for key in weights):
        weights = {k.removeprefix(BACKBONE_PREFIX): v for k, v in weights.items() if k.startswith(BACKBONE_PREFIX)}
    return weights, state.get("arch")


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict names of the model's final classifier (`fc.weight`, `linear.bias`, ...)."""
    owned = {id(p) for p in model.classifier.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in owned}


def load_backbone(model: nn.Module, path: str | Path, arch: str) -> None:
    """Load all of `model` but its classifier (left as initialised) from a kdtui checkpoint."""
    weights, trained_arch = backbone_weights(path)
    if trained_arch != arch:
        raise CheckpointError(f"{path}: its backbone is a {trained_arch!r} but model.arch is {arch!r}; "
                              f"set model.arch = {trained_arch!r}")
    head = classifier_keys(model)
    try:
        missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in head}, strict=False)
    except RuntimeError as err:  # same names, other shapes
        reason = str(err).splitlines()[-1].strip()[:200]
        raise CheckpointError(f"{path}: weights do not fit {arch!r}: {reason}") from None
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {arch!r}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
