"""What two checkpoints disagree on: `kdtui diff`, the TUI's diff screen and their exports.

Torch-free: everything here works from cached predictions (engine/predictions.py) with
numpy; torch is imported only when a cache misses (evaluation) or when images are needed
and not yet cached. Images of the disagreeing samples are cached per pair in a "view" file,
so the TUI shows them without torch.

`python -m engine.diff A.pt B.pt --split test --view` fills both caches and the view file;
the TUI runs it in a subprocess when something is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import CheckpointError, UserError
from engine.predictions import (
    Predictions,
    atomic_save_npz,
    cache_dir,
    data_in_memory,
    get_predictions,
    split_data,
)
from engine.rundir import atomic_write_text, iter_run_dirs

FILTERS = ("all", "a_right", "b_right", "both_wrong")
# category codes per sample
AGREE_RIGHT, A_RIGHT, B_RIGHT, BOTH_WRONG_DIFF, BOTH_WRONG_SAME = range(5)
_FILTER_CODES = {"all": (A_RIGHT, B_RIGHT, BOTH_WRONG_DIFF), "a_right": (A_RIGHT,), "b_right": (B_RIGHT,),
                 "both_wrong": (BOTH_WRONG_DIFF,)}
CATEGORY_NAMES = ("agree_right", "a_right_b_wrong", "a_wrong_b_right", "both_wrong_different", "both_wrong_same")


# ---------------------------------------------------------------- references -> files
def resolve_checkpoint(ref: str, runs_root: Path) -> Path:
    """A checkpoint path, a run (its best.pt), or RUN@best / RUN@last / RUN@<epoch>."""
    if Path(ref).is_file():
        return Path(ref)
    run_ref, _, which = ref.rpartition("@") if "@" in ref else (ref, "", "best")
    run = find_run_dir(run_ref, runs_root)
    if which in ("best", "last"):
        name = f"{which}.pt"
    elif which.isdigit():
        name = f"epoch_{int(which):04d}.pt"
    else:
        raise UserError(f"{ref}: expected RUN@best, RUN@last or RUN@<epoch number>, got {which!r} after '@'")
    path = run.checkpoints / name
    if not path.is_file():
        have = sorted(p.stem.removeprefix("epoch_").lstrip("0") or "0" for p in run.checkpoints.glob("*.pt"))
        raise UserError(f"{ref}: run {run.id} has no {name}; available: {', '.join(have) or 'no checkpoints yet'}")
    return path


def find_run_dir(ref: str, runs_root: Path) -> Any:
    """A run by directory, exact id, unique id prefix or unique name (UserError otherwise)."""
    from engine.rundir import RunDir

    if Path(ref).is_dir():
        if (Path(ref) / "run.json").is_file():
            return RunDir(Path(ref))
        raise UserError(f"{ref}: is a directory, expected a checkpoint file (.pt) or a run directory")
    runs = list(iter_run_dirs(runs_root))
    for match in (lambda r: r.id == ref, lambda r: r.id.startswith(ref), lambda r: r.read_info().get("name") == ref):
        found = [r for r in runs if match(r)]
        if len(found) > 1:
            raise UserError(f"run {ref!r} is ambiguous: {', '.join(r.id for r in found[:10])}")
        if found:
            return found[0]
    raise UserError(f"{ref!r} is neither a checkpoint file nor a run in {runs_root}")


# ---------------------------------------------------------------- the comparison
def check_compatible(metas: list[dict[str, Any]], paths: list[Path]) -> None:
    """Same data set, class count and class names, or a one-line CheckpointError."""
    (ma, mb), (pa, pb) = metas, paths
    for key in ("dataset", "num_classes", "class_names"):
        va, vb = ma.get(key), mb.get(key)
        if va != vb:
            if key == "class_names":
                va, vb = (f"{len(v or [])} names from {(v or ['-'])[0]!r}" for v in (va, vb))
            raise CheckpointError(f"cannot compare {pa} and {pb}: different {key} ({va} vs {vb})")


@dataclass(frozen=True)
class Diff:
    a: Predictions
    b: Predictions

    @property
    def split(self) -> str:
        return self.a.split

    @property
    def n(self) -> int:
        return self.a.n

    @property
    def class_names(self) -> list[str]:
        names = self.a.meta.get("class_names") or []
        return list(names) if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.a.meta.get("num_classes") or 0)

    @property
    def agreement(self) -> float:
        """Fraction of samples on which A and B predict the same class (right or wrong)."""
        return float((self.a.pred == self.b.pred).mean()) if self.n else 0.0

    @cached_property
    def category(self) -> np.ndarray:
        """Per sample: one of the five category codes above."""
        y, pa, pb = self.a.labels, self.a.pred, self.b.pred
        ra, rb = pa == y, pb == y
        cat = np.full(self.n, BOTH_WRONG_SAME, dtype=np.int8)
        cat[ra & rb] = AGREE_RIGHT
        cat[ra & ~rb] = A_RIGHT
        cat[~ra & rb] = B_RIGHT
        cat[~ra & ~rb & (pa != pb)] = BOTH_WRONG_DIFF
        return cat

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.category, minlength=5)
        return {name: int(found[code]) for code, name in enumerate(CATEGORY_NAMES) if code != AGREE_RIGHT}

    def per_class(self) -> dict[str, dict[str, Any]]:
        y, c, k = self.a.labels, self.category, self.num_classes
        total = np.bincount(y, minlength=k)
        by = {code: np.bincount(y[c == code], minlength=k) for code in range(5)}
        right_a, right_b = (np.bincount(y[p.pred == y], minlength=k) for p in (self.a, self.b))
        return {name: {"n": int(total[i]),
                       "disagreements": int(by[A_RIGHT][i] + by[B_RIGHT][i] + by[BOTH_WRONG_DIFF][i]),
                       "a_right_b_wrong": int(by[A_RIGHT][i]), "a_wrong_b_right": int(by[B_RIGHT][i]),
                       "both_wrong_different": int(by[BOTH_WRONG_DIFF][i]),
                       "acc_a": float(right_a[i] / total[i]) if total[i] else 0.0,
                       "acc_b": float(right_b[i] / total[i]) if total[i] else 0.0}
                for i, name in enumerate(self.class_names)}

    def disagreements(self) -> np.ndarray:
        """Indices where A and B predict different classes, ascending."""
        return np.flatnonzero(self.a.pred != self.b.pred)

    def select(self, filter: str = "all", class_name: str | None = None) -> np.ndarray:
        """Disagreeing indices in one category (`filter`) and, optionally, of one true class."""
        if filter not in FILTERS:
            raise UserError(f"filter {filter!r}: expected one of {', '.join(FILTERS)}")
        mask = np.isin(self.category, _FILTER_CODES[filter])
        if class_name is not None:
            mask &= self.a.labels == self.class_index(class_name)
        return np.flatnonzero(mask)

    def class_index(self, name: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            raise UserError(f"class {name!r}: not in this data set; expected one of "
                            f"{', '.join(self.class_names[:20])}{' ...' if self.num_classes > 20 else ''}") from None

    def row(self, i: int) -> dict[str, Any]:
        names = self.class_names
        return {"index": int(i), "label": names[int(self.a.labels[i])],
                "a_pred": names[int(self.a.pred[i])], "a_prob": round(float(self.a.top_prob[i, 0]), 6),
                "b_pred": names[int(self.b.pred[i])], "b_prob": round(float(self.b.top_prob[i, 0]), 6),
                "a_loss": round(float(self.a.loss[i]), 6), "b_loss": round(float(self.b.loss[i]), 6),
                "category": CATEGORY_NAMES[int(self.category[i])]}

    def summary(self) -> dict[str, Any]:
        """The stable fields without the list (also what the TUI's header shows)."""
        def model(p: Predictions) -> dict[str, Any]:
            return {k: p.meta.get(k) for k in ("arch", "method", "epoch", "dataset")} | {"sha256": p.digest}

        return {"a": self.a.checkpoint, "b": self.b.checkpoint, "split": self.split, "n": self.n,
                "acc_a": self.a.accuracy, "acc_b": self.b.accuracy, "agreement": self.agreement,
                "counts": self.counts(), "per_class": self.per_class(), "classes": self.class_names,
                "models": {"a": model(self.a), "b": model(self.b)}}

    def to_json(self, filter: str = "all", class_name: str | None = None, limit: int | None = None) -> dict[str, Any]:
        chosen = self.select(filter, class_name)
        return {**self.summary(), "filter": filter, "class": class_name, "listed": int(chosen.size),
                "disagreements": [self.row(i) for i in chosen[:limit]]}


def compare(a: Predictions, b: Predictions) -> Diff:
    """Pair two predictions of the same images (checked per image, not only by count)."""
    check_compatible([a.meta, b.meta], [Path(a.checkpoint), Path(b.checkpoint)])
    if a.split != b.split:
        raise UserError(f"cannot compare a {a.split!r} split with a {b.split!r} split")
    if a.n != b.n or not np.array_equal(a.labels, b.labels) or not np.array_equal(a.signature, b.signature):
        sizes = f"{a.n} vs {b.n} images" if a.n != b.n else f"{a.n} images each, not the same ones"
        raise CheckpointError(f"cannot compare {a.checkpoint} and {b.checkpoint} on {a.split!r}: their recipes select "
                              f"different images ({sizes}; data.scale, data.val_fraction or train.seed differ)"
                              + ("; --split test is shared" if a.split != "test" else ""))
    return Diff(a, b)


def run_diff(a: str | Path, b: str | Path, split: str = "test", device: str = "cpu", batch_size: int = 512,
             view: bool | None = None) -> Diff:
    """Compare two checkpoints, evaluating only what is not cached.

    `view` caches the images of the disagreements for the TUI: True always, None (default) only when
    the data is already in memory from evaluating (a few ms then), False never.
    """
    paths = [Path(a), Path(b)]
    diff = compare(*get_predictions(paths, split, device, batch_size, check=lambda m: check_compatible(m, paths)))
    if view or (view is None and data_in_memory(diff.a.meta["recipe"]) and load_view(diff) is None):
        view_images(diff)
    return diff


# ---------------------------------------------------------------- images of the disagreements
def view_file(diff: Diff) -> Path:
    """Symmetric in A and B (the disagreements are), so swapping them in the TUI reuses it."""
    first, second = sorted((diff.a, diff.b), key=lambda p: p.digest)
    return cache_dir(Path(first.checkpoint)) / f"view-{first.digest[:24]}-{second.digest[:24]}-{diff.split}.npz"


def load_view(diff: Diff) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, uint8 images [k,3,H,W]) of every disagreement, if cached and current."""
    path = view_file(diff)
    try:
        with np.load(path, allow_pickle=False) as npz:
            indices, images = npz["indices"], npz["images"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return (indices, images) if np.array_equal(indices, diff.disagreements()) and len(images) == len(indices) else None


def view_images(diff: Diff) -> tuple[np.ndarray, np.ndarray]:
    """Cached view, else rebuild the data from A's recipe (torch) and cache it."""
    cached = load_view(diff)
    if cached is not None:
        return cached
    _, split = split_data(diff.a.meta["recipe"], diff.split)
    indices = diff.disagreements()
    images = split.images(indices).numpy() if indices.size else np.zeros((0, 3, 1, 1), np.uint8)
    atomic_save_npz(view_file(diff), indices=indices, images=images)
    return indices, images


def image_of(view: tuple[np.ndarray, np.ndarray], index: int) -> np.ndarray | None:
    """One HxWx3 uint8 image from a view, by split index."""
    indices, images = view
    pos = int(np.searchsorted(indices, index))
    if pos < len(indices) and indices[pos] == index:
        return np.ascontiguousarray(images[pos].transpose(1, 2, 0))
    return None


# ---------------------------------------------------------------- exports
CSV_FIELDS = ("index", "label", "a_pred", "a_prob", "b_pred", "b_prob", "a_loss", "b_loss", "category")
SHEET_COLUMNS, SHEET_PAD, SHEET_LINE, SHEET_TILE = 8, 4, 12, 128


def sheet_geometry(count: int, image_size: int) -> tuple[int, int, int, int]:
    """(scale, columns, width, height) of a contact sheet; tiles are upscaled to about 128 px."""
    scale = max(1, SHEET_TILE // image_size)
    cols = max(1, min(SHEET_COLUMNS, count))
    rows = max(1, math.ceil(count / cols))
    tile_w, tile_h = image_size * scale, image_size * scale + 3 * SHEET_LINE + SHEET_PAD
    return scale, cols, cols * tile_w + (cols + 1) * SHEET_PAD, rows * tile_h + (rows + 1) * SHEET_PAD


def contact_sheet(diff: Diff, indices: np.ndarray, view: tuple[np.ndarray, np.ndarray]) -> Any:
    """A PIL image: each tile the upscaled image over three lines (truth, A's and B's answer)."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(view[1].shape[-1]) if len(view[1]) else 32
    scale, cols, width, height = sheet_geometry(len(indices), size)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    tile_w, tile_h = size * scale, size * scale + 3 * SHEET_LINE + SHEET_PAD
    chars = max(4, tile_w // 6)
    for n, i in enumerate(indices):
        x = SHEET_PAD + (n % cols) * (tile_w + SHEET_PAD)
        y = SHEET_PAD + (n // cols) * (tile_h + SHEET_PAD)
        pixels = image_of(view, int(i))
        if pixels is not None:
            sheet.paste(Image.fromarray(pixels).resize((tile_w, tile_w), Image.Resampling.NEAREST), (x, y))
        row = diff.row(int(i))
        lines = [(f"#{row['index']} {row['label']}", (230, 230, 230))]
        for who in ("a", "b"):
            ok = row[f"{who}_pred"] == row["label"]
            lines.append((f"{who.upper()}: {row[f'{who}_pred']} {row[f'{who}_prob']:.2f}",
                          (110, 220, 110) if ok else (240, 110, 110)))
        for line, (text, colour) in enumerate(lines):
            draw.text((x, y + tile_w + 2 + line * SHEET_LINE), text[:chars], fill=colour, font=font)
    return sheet


def export(diff: Diff, folder: Path, indices: np.ndarray, sheet_limit: int) -> list[Path]:
    """disagreements.csv (every listed row) and contact_sheet.png (the first `sheet_limit`), atomically."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--export {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(diff.row(int(i)) for i in indices)
    shown = indices[:sheet_limit]
    sheet = contact_sheet(diff, shown, view_images(diff))
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    csv_path, png_path = folder / "disagreements.csv", folder / "contact_sheet.png"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_save_bytes(png_path, png.getvalue())
    return [csv_path, png_path]


def atomic_save_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------- `python -m engine.diff`
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.diff", description="Fill the diff caches of A and B.")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--view", action="store_true", help="also cache the images of the disagreements")
    args = parser.parse_args(argv)
    try:
        diff = run_diff(args.a, args.b, args.split, args.device, view=args.view)
    except UserError as err:  # DataError is one too
        print(f"kdtui: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    summary = diff.summary()
    print(json.dumps({k: summary[k] for k in ("a", "b", "split", "n", "acc_a", "acc_b", "agreement", "counts")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
