"""Evaluate a checkpoint on a split of the data set it was trained on (`kdtui eval`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.data import DataBundle, build_data
from engine.data import augment as aug
from engine.errors import CheckpointError
from engine.methods.base import topk_correct
from engine.recipe_ssl import SSL_METHODS


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's evaluation network, in eval mode, and the checkpoint dict itself."""
    from engine.models import build_model

    state = load_checkpoint(path, map_location=device)
    if state.get("method") in SSL_METHODS:
        raise CheckpointError(f"{path}: a {state['method']} checkpoint has no class head; evaluate its backbone "
                              'with a linear_eval recipe ([teacher] checkpoint = "this file")')
    try:
        model = build_model(state["arch"], int(state["num_classes"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        detail = str(err).splitlines()[0][:160]
        raise CheckpointError(f"{path}: weights do not fit arch {state.get('arch')!r}: {detail}") from None
    return model.to(device).eval(), state


def checkpoint_data(state: dict[str, Any]) -> DataBundle:
    """Rebuild the data set (same split seed and fractions) the checkpoint's recipe used."""
    data = tomllib.loads(state["recipe"]).get("data", {})
    seed = tomllib.loads(state["recipe"]).get("train", {}).get("seed", 0)
    return build_data(data.get("dataset", "embedded"), data.get("root", "data"), scale=data.get("scale", 1.0),
                      val_fraction=data.get("val_fraction", 0.0), seed=seed, download=False,
                      image_size=data.get("image_size"), embedded_per_class=data.get("embedded_per_class"))


@torch.no_grad()
def evaluate_checkpoint(path: str | Path, split: str = "test", device: str = "cpu",
                        batch_size: int = 512) -> dict[str, Any]:
    model, state = load_classifier(path, device)
    data = checkpoint_data(state)
    chosen = getattr(data, split)
    if chosen is None:
        raise CheckpointError(f"{path}: the recipe has no {split!r} split (set data.val_fraction > 0)")
    totals = torch.zeros(3, dtype=torch.float64)
    for images, labels, _ in chosen.batches(batch_size, shuffle=False, drop_last=False, generator=None, device=device):
        out = model(aug.normalize(images, data.mean, data.std))
        logits = (out[0] if isinstance(out, tuple) else out).float()
        totals[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").cpu()
        totals[1:] += topk_correct(logits, labels).cpu()
    n = len(chosen)
    loss, top1, top5 = (totals / max(n, 1)).tolist()
    return {"checkpoint": str(path), "split": split, "n": n, "loss": loss, "top1": top1, "top5": top5}
