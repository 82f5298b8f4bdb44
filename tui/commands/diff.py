"""`kdtui diff A B`: what two checkpoints disagree on (engine/diff.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tui.cli import app
from tui.commands.common import RunsDir, fail, root, user_errors

if TYPE_CHECKING:
    import numpy as np

    from engine.diff import Diff

TEXT_LIMIT = 20  # rows printed without --limit
SHEET_LIMIT = 64  # tiles in the contact sheet without --limit


@app.command()
@user_errors
def diff(
    a: Annotated[str, typer.Argument(help="Checkpoint file, run id/name (its best.pt), RUN@last or RUN@<epoch>.")],
    b: Annotated[str, typer.Argument(help="The other checkpoint, in the same forms.")],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    filter_: Annotated[str, typer.Option("--filter", help="all, a_right, b_right or both_wrong.")] = "all",
    class_name: Annotated[str | None, typer.Option("--class", help="Only images of this true class.")] = None,
    limit: Annotated[int | None, typer.Option(help="List at most N (default: 20 in text; all in --json/CSV).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    export_dir: Annotated[Path | None, typer.Option(
        "--export", help="Write disagreements.csv and contact_sheet.png into this folder.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N], for checkpoints not evaluated yet.")] = "cpu",
    runs_dir: RunsDir = None,
) -> None:
    """Compare two checkpoints on one split: accuracies, agreement and the images they disagree on.

    Predictions are cached per checkpoint content and split, so a second diff does not evaluate.
    """
    if split not in ("test", "val", "train"):
        raise fail(f"--split: expected test, val or train, got {split!r}")
    if filter_ not in ("all", "a_right", "b_right", "both_wrong"):
        raise fail(f"--filter: expected all, a_right, b_right or both_wrong, got {filter_!r}")
    if limit is not None and limit < 0:
        raise fail(f"--limit: expected a number >= 0, got {limit}")
    from engine.diff import export, resolve_checkpoint, run_diff

    path_a, path_b = (resolve_checkpoint(ref, root(runs_dir)) for ref in (a, b))
    result = run_diff(path_a, path_b, split, device)
    chosen = result.select(filter_, class_name)
    if export_dir is not None:
        written = export(result, export_dir, chosen[:limit], SHEET_LIMIT if limit is None else limit)
    if as_json:
        print(json.dumps(result.to_json(filter_, class_name, limit)))
    else:
        print(format_text(result, chosen, filter_, class_name, TEXT_LIMIT if limit is None else limit))
    if export_dir is not None and not as_json:
        print("wrote " + ", ".join(str(p) for p in written))


def format_text(result: Diff, chosen: np.ndarray, filter_: str, class_name: str | None, limit: int) -> str:
    s, names = result.summary(), result.class_names
    models = s["models"]
    lines = [f"A: {s['a']} ({models['a']['arch']}, epoch {models['a']['epoch']})",
             f"B: {s['b']} ({models['b']['arch']}, epoch {models['b']['epoch']})",
             f"{s['split']}: {s['n']} images   accuracy A {s['acc_a']:.2%}  B {s['acc_b']:.2%}   "
             f"agreement {s['agreement']:.2%}",
             *(f"  {label:<24}{s['counts'][key]:>7}" for key, label in (
                 ("a_right_b_wrong", "A right, B wrong"), ("a_wrong_b_right", "A wrong, B right"),
                 ("both_wrong_different", "both wrong, different"), ("both_wrong_same", "both wrong, same"))),
             "per class (disagreements/images  A>B  B>A  both wrong):"]
    width = max((len(n) for n in names), default=5)
    for name, c in s["per_class"].items():
        lines.append(f"  {name:<{width}} {c['disagreements']:>5}/{c['n']:<5} {c['a_right_b_wrong']:>4} "
                     f"{c['a_wrong_b_right']:>4} {c['both_wrong_different']:>4}")
    where = f"filter {filter_}" + (f", class {class_name}" if class_name else "")
    lines.append(f"disagreements ({where}): {len(chosen)}")
    if len(chosen):
        lines.append(f"  {'index':>6}  {'label':<{width}}  {'A':<{width + 6}}  B")
    for i in chosen[:limit]:
        r = result.row(int(i))
        lines.append(f"  {r['index']:>6}  {r['label']:<{width}}  {r['a_pred']:<{width}} {r['a_prob']:.2f}  "
                     f"{r['b_pred']} {r['b_prob']:.2f}")
    if len(chosen) > limit:
        lines.append(f"  ... and {len(chosen) - limit} more (--limit N, --json, --export DIR)")
    return "\n".join(lines)
