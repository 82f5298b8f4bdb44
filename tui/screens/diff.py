"""Diff screen: what two checkpoints disagree on, image by image.

Torch-free. It reads the caches `kdtui diff` writes (engine/predictions.py: per-checkpoint
predictions; engine/diff.py: the images of the pair's disagreements). When something is
missing, a thread worker runs `python -m engine.diff A B --split S --view` in a subprocess
(killed if the selection changes) and then reads the caches again, so the UI thread never
evaluates and the TUI process never imports torch.

Import this module before `App.run()`: textual-image queries the terminal (Kitty / Sixel /
half-blocks) at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image as PILImage
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Select, Static
from textual.worker import get_current_worker
from textual_image import widget as image_widgets

from engine.diff import FILTERS, Diff, compare, image_of, load_view, resolve_checkpoint
from engine.errors import UserError
from engine.predictions import load_cached
from engine.rundir import iter_run_dirs, runs_root

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
NAME_W = 7  # class names in the table are cut to this
MAX_ROWS = 500  # DataTable fills slowly with thousands of rows (~0.4 ms each); narrow with the filters
FILTER_LABELS = {"all": "all disagreements", "a_right": "A right, B wrong", "b_right": "A wrong, B right",
                 "both_wrong": "both wrong"}
RENDERERS = {"auto": "Image", "halfcell": "HalfcellImage", "unicode": "UnicodeImage", "sixel": "SixelImage",
             "kitty": "TGPImage"}


def checkpoint_choices(folder: str | Path | None) -> list[tuple[str, str]]:
    """(label, file name) of a checkpoints folder: best, last, then epochs in order."""
    files = sorted(p.name for p in Path(folder).glob("*.pt")) if folder and Path(folder).is_dir() else []
    first = [f for f in ("best.pt", "last.pt") if f in files]
    rest = [f for f in files if f not in first]
    return [(f.removesuffix(".pt").replace("epoch_", "epoch ").replace(" 000", " ").replace(" 00", " "), f)
            for f in first + rest]


def answer(name: str, prob: float) -> str:
    """A table cell: the predicted class (shortened) and its probability, '.62' style."""
    return f"{name[:NAME_W]:<{NAME_W}} " + (f"{prob:.2f}"[1:] if prob < 0.995 else "1.0")


class TopBars(Widget):
    """One model's top-5 as bars; the true class marked (green), a wrong top-1 red."""

    DEFAULT_CSS = "TopBars { height: 7; text-wrap: nowrap; text-overflow: ellipsis; }"

    def __init__(self, who: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self.who = who
        self.data: tuple[str, list[tuple[str, float]], str, float] | None = None

    def show(self, title: str, top: list[tuple[str, float]], truth: str, truth_prob: float) -> None:
        self.data = (title, top, truth, truth_prob)
        self.refresh()

    def render(self) -> Text:
        if self.data is None:
            return Text("")
        title, top, truth, truth_prob = self.data
        right = top[0][0] == truth
        text = Text.assemble((f"{self.who} ", "bold"), ("✓ " if right else "✗ ", "green" if right else "red"),
                             (title, "dim"))
        name_w = max(1, min(9, max(len(name) for name, _ in top), self.size.width - 7))
        bar_w = max(self.size.width - name_w - 6, 0)
        rows = [(name, p, rank) for rank, (name, p) in enumerate(top)]
        if truth not in [name for name, _ in top]:  # its probability from the cached loss: p = exp(-loss)
            rows.append((truth, truth_prob, len(top)))
        for name, p, rank in rows:
            units = round(p * bar_w * 8)
            bar = "█" * (units // 8) + (" ▏▎▍▌▋▊▉"[units % 8] if units % 8 else "")
            style = "bold green" if name == truth else ("red" if rank == 0 else "")
            text.append(f"\n{'●' if name == truth else ' '}{name[:name_w]:<{name_w}} ", style=style)
            text.append(f"{bar:<{bar_w}}", style=style or "cyan")
            text.append(f"{min(p, 0.999):>4.0%}" if p < 0.995 else "100%", style=style)
        return text


@dataclass
class Side:
    """What one picker (A or B) points at."""

    folder: str | None = None  # a checkpoints folder
    file: str | None = None  # a file name in it

    @property
    def path(self) -> Path | None:
        return Path(self.folder) / self.file if self.folder and self.file else None


class DiffScreen(Screen[None]):
    """Pick A and B (runs and their checkpoints), a split and a filter; browse the disagreements."""

    CSS_PATH = str(Path(__file__).resolve().parent.parent / "styles" / "diff.tcss")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "back"),
        Binding("f", "cycle_filter", "filter"),
        Binding("s", "cycle_split", "split"),
        Binding("x", "swap", "swap A/B"),
        Binding("r", "reload", "reload"),
    ]

    class Loaded(Message):
        def __init__(self, token: int, diff: Diff | None, view: Any, note: str, busy: bool = False) -> None:
            super().__init__()
            self.token, self.diff, self.view, self.note, self.busy = token, diff, view, note, busy

    def __init__(self, a: str | Path | None = None, b: str | Path | None = None, runs_dir: str | Path | None = None,
                 split: str = "test", filter: str = "all", device: str = "cpu",
                 image_renderer: str | None = None) -> None:
        super().__init__()
        self.root = runs_root(runs_dir)
        self.split = split if split in ("test", "val", "train") else "test"
        self.filter = filter if filter in FILTERS else "all"
        self.class_name: str | None = None
        self.device = device
        renderer = image_renderer or os.environ.get("KDTUI_IMAGE", "auto")
        self.image_class = getattr(image_widgets, RENDERERS.get(renderer, "Image"))
        self.sides = {"a": Side(), "b": Side()}
        self.error: str | None = None
        for key, ref in (("a", a), ("b", b)):
            if ref is not None:
                try:
                    path = resolve_checkpoint(str(ref), self.root).resolve()
                    self.sides[key] = Side(str(path.parent), path.name)
                except UserError as err:
                    self.error = str(err)
        self.diff: Diff | None = None
        self.view: Any = None
        self.rows: np.ndarray = np.zeros(0, dtype=np.int64)
        self.row_index: dict[Any, int] = {}  # table row key -> sample index
        self.token = 0
        self.loaded_key: tuple[Any, ...] | None = None

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        folders = self.folder_choices()
        with Vertical(id="diff-pickers"):
            for key in ("a", "b"):
                side = self.sides[key]
                with Horizontal(classes="diff-pick"):
                    yield Static(key.upper(), classes="diff-pick-label")
                    yield Select(folders, id=f"{key}-run", prompt="run", compact=True, value=side.folder or Select.NULL)
                    yield Select(checkpoint_choices(side.folder), id=f"{key}-ckpt", prompt="checkpoint", compact=True,
                                 value=side.file or Select.NULL)
            with Horizontal(classes="diff-pick"):
                yield Select([(s, s) for s in ("test", "val", "train")], id="split", value=self.split,
                             allow_blank=False, compact=True)
                yield Select([(FILTER_LABELS[f], f) for f in FILTERS], id="filter", value=self.filter,
                             allow_blank=False, compact=True)
                yield Select([], id="class", prompt="all classes", compact=True)
        yield Static(self.error or "pick A and B", id="diff-summary")
        with Horizontal(id="diff-body"):
            yield DataTable(id="diff-table", cursor_type="row", zebra_stripes=True)
            with Vertical(id="diff-detail"):
                yield Static("", id="diff-caption")
                with Vertical(id="diff-image-box"):
                    yield self.image_class(None, id="diff-image")
                with Horizontal(id="diff-bars"):
                    yield TopBars("A", id="bars-a")
                    yield TopBars("B", id="bars-b")
        yield Footer(compact=True)

    def folder_choices(self) -> list[tuple[str, str]]:
        """Runs under the root (name and id), plus any other folder an initial ref points into."""
        choices = []
        for run in iter_run_dirs(self.root):
            name = run.read_info().get("name") or ""
            label = run.id if not name or name in run.id else f"{name} · {run.id}"
            choices.append((label, str(run.checkpoints.resolve())))
        known = {value for _, value in choices}
        for side in self.sides.values():
            if side.folder and side.folder not in known:
                choices.append((side.folder, side.folder))
                known.add(side.folder)
        return choices

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("#", "truth", "A  p", "B  p")
        self.request_load()
        table.focus()

    # ------------------------------------------------------------ pickers
    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        which, value = event.select.id or "", None if event.value is Select.NULL else event.value
        if which in ("a-run", "b-run"):
            side = self.sides[which[0]]
            if value == side.folder:
                return
            side.folder, options = value, checkpoint_choices(value)
            files = [f for _, f in options]
            side.file = "best.pt" if "best.pt" in files else (files[0] if files else None)
            ckpt = self.query_one(f"#{which[0]}-ckpt", Select)
            ckpt.set_options(options)
            ckpt.value = side.file or Select.NULL
            self.request_load()
        elif which in ("a-ckpt", "b-ckpt"):
            self.sides[which[0]].file = value
            self.request_load()
        elif which == "split" and value:
            self.split = value
            self.request_load()
        elif which == "filter" and value:
            self.filter = value
            self.refill()
        elif which == "class":
            self.class_name = value
            self.refill()

    def action_cycle_filter(self) -> None:
        self.query_one("#filter", Select).value = FILTERS[(FILTERS.index(self.filter) + 1) % len(FILTERS)]

    def action_cycle_split(self) -> None:
        splits = ("test", "val", "train")
        self.query_one("#split", Select).value = splits[(splits.index(self.split) + 1) % 3]

    def action_swap(self) -> None:
        self.sides["a"], self.sides["b"] = self.sides["b"], self.sides["a"]
        for key in ("a", "b"):
            side = self.sides[key]
            with self.prevent(Select.Changed):
                self.query_one(f"#{key}-run", Select).value = side.folder or Select.NULL
                ckpt = self.query_one(f"#{key}-ckpt", Select)
                ckpt.set_options(checkpoint_choices(side.folder))
                ckpt.value = side.file or Select.NULL
        self.request_load()

    def action_reload(self) -> None:
        self.loaded_key = None
        self.request_load()

    def action_close(self) -> None:
        self.dismiss(None)

    # ------------------------------------------------------------ loading
    def request_load(self) -> None:
        a, b = self.sides["a"].path, self.sides["b"].path
        key = (a, b, self.split)
        if a is None or b is None or key == self.loaded_key:
            return
        self.loaded_key = key
        self.token += 1
        self.query_one("#diff-summary", Static).update(f"loading {a.name} vs {b.name} on {self.split} ...")
        self.load(self.token, a, b, self.split)

    @work(thread=True, exclusive=True, group="diff-load")
    def load(self, token: int, a: Path, b: Path, split: str) -> None:
        """Caches first (numpy only); on a miss, `python -m engine.diff` fills them, then read again."""
        try:
            diff, view = read_caches(a, b, split)
            if diff is not None and view is not None:
                self.post_message(self.Loaded(token, diff, view, ""))
                return
            if diff is not None:  # predictions cached, images not: show the table meanwhile
                self.post_message(self.Loaded(token, diff, None, "loading images ..."))
            else:
                self.post_message(self.Loaded(token, None, None, f"evaluating {a.name} and {b.name} on {split} "
                                              f"({self.device}); cached for next time ...", busy=True))
            error = self.fill_caches(a, b, split)
            if error is not None:
                self.post_message(self.Loaded(token, None, None, error))
                return
            diff, view = read_caches(a, b, split)
            self.post_message(self.Loaded(token, diff, view, "" if diff else "caches missing after evaluation"))
        except UserError as err:
            self.post_message(self.Loaded(token, None, None, str(err)))
        except Exception as err:  # shown in place; the screen stays usable
            self.post_message(self.Loaded(token, None, None, f"{type(err).__name__}: {err}"))

    def fill_caches(self, a: Path, b: Path, split: str) -> str | None:
        """Run the engine in a subprocess; killed when this worker is cancelled. None or the error line."""
        worker = get_current_worker()
        path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        command = [sys.executable, "-m", "engine.diff", str(a), str(b), "--split", split, "--device", self.device,
                   "--view"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            while True:
                try:
                    _, err = proc.communicate(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if worker.is_cancelled:
                        proc.kill()
                        return "cancelled"
        if proc.returncode != 0:
            lines = [line for line in err.splitlines() if line.strip()]
            return (lines[-1] if lines else f"engine.diff exited with {proc.returncode}").removeprefix("kdtui: error: ")
        return None

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        if message.token != self.token:
            return  # a newer selection is loading
        summary = self.query_one("#diff-summary", Static)
        if message.diff is None:
            summary.update(Text(message.note, style="yellow" if message.busy else "bold red"))
            self.diff, self.view = None, None
            self.refill()
            return
        keep_class = self.diff is not None and self.diff.class_names == message.diff.class_names
        self.diff, self.view = message.diff, message.view
        summary.update(summary_text(self.diff, message.note))
        if not keep_class:
            self.class_name = None
            with self.prevent(Select.Changed):
                self.query_one("#class", Select).set_options([(n, n) for n in self.diff.class_names])
        self.refill()

    # ------------------------------------------------------------ table and detail
    def refill(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        if self.diff is None:
            self.rows = np.zeros(0, dtype=np.int64)
            self.show_detail(None)
            return
        self.rows = self.diff.select(self.filter, self.class_name)
        names, d = self.diff.class_names, self.diff
        shown = self.rows[:MAX_ROWS].tolist()
        keys = table.add_rows((str(i), names[d.a.labels[i]][:NAME_W], answer(names[d.a.pred[i]], d.a.top_prob[i, 0]),
                               answer(names[d.b.pred[i]], d.b.top_prob[i, 0])) for i in shown)
        self.row_index = {key: i for key, i in zip(keys, shown, strict=True)}
        count = f"{len(self.rows)} rows" + (f", first {MAX_ROWS} shown" if len(self.rows) > MAX_ROWS else "")
        where = FILTER_LABELS[self.filter] + (f" · {self.class_name}" if self.class_name else "")
        table.border_title = f"{where} · {count}"
        self.show_detail(int(self.rows[0]) if len(self.rows) else None)

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key in self.row_index:
            self.show_detail(self.row_index[event.row_key])

    def show_detail(self, index: int | None) -> None:
        caption, image = self.query_one("#diff-caption", Static), self.query_one("#diff-image")
        bars = self.query_one("#bars-a", TopBars), self.query_one("#bars-b", TopBars)
        if self.diff is None or index is None:
            caption.update("no disagreement selected" if self.diff is not None else "")
            image.image = None
            for bar in bars:
                bar.data = None
                bar.refresh()
            return
        d, names = self.diff, self.diff.class_names
        truth = names[int(d.a.labels[index])]
        caption.update(Text.assemble((f"#{index} ", "bold"), "truth ", (truth, "bold green")))
        pixels = image_of(self.view, index) if self.view is not None else None
        image.image = upscale(pixels) if pixels is not None else None
        for bar, p in zip(bars, (d.a, d.b), strict=True):
            top = [(names[int(c)], float(q)) for c, q in zip(p.top_idx[index], p.top_prob[index], strict=True)]
            bar.show(str(p.meta.get('arch')), top, truth, float(np.exp(-p.loss[index])))


def read_caches(a: Path, b: Path, split: str) -> tuple[Diff | None, Any]:
    """(diff, view) from the caches alone: None where something is not cached yet."""
    pa, pb = load_cached(a, split), load_cached(b, split)
    if pa is None or pb is None:
        return None, None
    diff = compare(pa, pb)
    return diff, load_view(diff)


def upscale(pixels: np.ndarray, target: int = 256) -> PILImage.Image:
    """Nearest-neighbour upscale so graphics terminals show crisp pixels, not a blur."""
    image = PILImage.fromarray(pixels)
    factor = max(1, target // max(image.size))
    return image.resize((image.width * factor, image.height * factor), PILImage.Resampling.NEAREST)


def summary_text(d: Diff, note: str) -> Text:
    s, c = d.summary(), d.counts()
    ma, mb = s["models"]["a"], s["models"]["b"]
    return Text.assemble(
        ("A ", "bold"), f"{ma['arch']} ep {ma['epoch']}  ", ("B ", "bold"), f"{mb['arch']} ep {mb['epoch']}",
        f"  · {s['split']} · {s['n']} images", (f"  {note}" if note else "", "yellow"), "\n",
        "acc A ", (f"{s['acc_a']:.1%}", "bold"), "  B ", (f"{s['acc_b']:.1%}", "bold"),
        "  agree ", (f"{s['agreement']:.1%}", "bold"),
        "  │ A✓B✗ ", (str(c["a_right_b_wrong"]), "green"), "  A✗B✓ ", (str(c["a_wrong_b_right"]), "green"),
        "  both✗≠ ", (str(c["both_wrong_different"]), "red"), "  both✗= ", str(c["both_wrong_same"]))
