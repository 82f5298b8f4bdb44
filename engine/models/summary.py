"""Per-layer table for `kdtui summary`: name, type, output shape and parameters of each layer.

Built with forward hooks on the model's own modules (not torchinfo): one dry forward pass in
eval mode under no_grad on a zero input. A row is a leaf module, or any module owning
parameters directly; its `params` count only the parameters it owns, so the rows always sum
to the model's total. Modules the forward pass never reaches are listed last with shape None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _shape(output: Any) -> Any:
    if isinstance(output, Tensor):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return [_shape(o) for o in output]
    return None


def layer_table(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[list[dict[str, Any]], int]:
    """Rows `{name, type, output_shape, params}` in execution order, and the total parameter count."""
    rows: dict[str, dict[str, Any]] = {}
    hooks = []

    def record(name: str) -> Any:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if name not in rows:  # a module called twice keeps its first shape
                rows[name] = {
                    "name": name or "(model)",
                    "type": type(module).__name__,
                    "output_shape": _shape(output),
                    "params": sum(p.numel() for p in module.parameters(recurse=False)),
                }

        return hook

    candidates = {
        name: module
        for name, module in model.named_modules()
        if not any(module.children()) or any(True for _ in module.parameters(recurse=False))
    }
    for name, module in candidates.items():
        hooks.append(module.register_forward_hook(record(name)))

    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training

    table = list(rows.values())
    for name, module in candidates.items():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if name not in rows and own:
            table.append(
                {"name": name or "(model)", "type": type(module).__name__, "output_shape": None, "params": own}
            )
    total = sum(p.numel() for p in model.parameters())
    return table, total
