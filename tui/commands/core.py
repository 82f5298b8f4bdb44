"""`kdtui check`, `kdtui eval`, `kdtui summary`: quick, read-only commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tui.cli import app
from tui.commands import run as _run  # noqa: F401  (registers run/resume)
from tui.commands.common import Overrides, fail, user_errors


@app.command()
@user_errors
def check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to validate.")],
    overrides: Overrides = None,
) -> None:
    """Validate recipes without running anything (exit 0, or one line per error and exit 2)."""
    from engine.recipe import RecipeError, expand_sweep, load_recipe

    errors = 0
    for path in recipes:
        try:
            recipe = load_recipe(path, overrides)
            points = len(expand_sweep(recipe, path))
            print(f"ok: {path} ({recipe.run.method}, {recipe.model.arch} on {recipe.data.dataset}"
                  + (f", {points} sweep points" if points > 1 else "") + ")")
        except RecipeError as err:
            print(f"kdtui: error: {err}", file=sys.stderr)
            errors += 1
    if errors:
        raise typer.Exit(2)


@app.command("eval")
@user_errors
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A kdtui checkpoint (.pt).")],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Loss, top-1 and top-5 of a checkpoint on a split of its data set."""
    if split not in ("test", "val", "train"):
        raise fail(f"--split: expected test, val or train, got {split!r}")
    from engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, split, device)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{checkpoint} on {split} ({result['n']} images): loss {result['loss']:.4f}  "
              f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}")


@app.command()
@user_errors
def summary(
    target: Annotated[str, typer.Argument(help="An arch name (resnet20) or a recipe file.")],
    num_classes: Annotated[int | None, typer.Option(help="Classes (default: 100, or the recipe's data set).")] = None,
    input_size: Annotated[str, typer.Option("--input", help="CxHxW, e.g. 3x32x32.")] = "3x32x32",
) -> None:
    """Every layer's name, output size and parameters, and the total."""
    from engine.models.registry import model_names

    try:
        c, h, w = (int(v) for v in input_size.lower().split("x"))
    except ValueError:
        raise fail(f"--input: expected CxHxW such as 3x32x32, got {input_size!r}") from None
    arch = target
    if target.endswith(".toml"):
        from engine.recipe import load_recipe

        recipe = load_recipe(target)
        arch = recipe.model.arch
        if num_classes is None:
            num_classes = recipe.model.num_classes or _dataset_classes(recipe.data.dataset)
    if arch not in model_names():
        raise fail(f"unknown arch {arch!r}; expected one of {', '.join(model_names())}")
    from engine.models import build_model
    from engine.models.summary import layer_table

    model = build_model(arch, num_classes or 100)
    rows, total = layer_table(model, (1, c, h, w))
    width = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{width}}  {'type':<18} {'output':<22} {'params':>12}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['type']:<18} {r['output_shape']!s:<22} {r['params']:>12,}")
    print(f"total parameters: {total:,}  ({arch}, {num_classes or 100} classes, input {c}x{h}x{w})")


def _dataset_classes(dataset: str) -> int:
    return {"cifar100": 100, "tinyimagenet": 200}.get(dataset, 10)
