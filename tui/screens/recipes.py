"""Recipes: the recipes/ tree, a highlighted TOML preview, validation shown in place; Enter launches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.syntax import Syntax
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DirectoryTree, Static

from tui.messages import RecipeChecked
from tui.widgets.format import error_line, shown_path
from tui.widgets.key_footer import KeyFooter

SKIPPED_DIRS = {"__pycache__", "runs", "data", "node_modules"}
PREVIEW_LIMIT = 200_000  # bytes of a recipe shown; TOML recipes are a few hundred


class RecipeTree(DirectoryTree):
    """Only folders and .toml files; Enter on a recipe opens the launch dialog."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "launch")]
    ICON_NODE, ICON_NODE_EXPANDED, ICON_FILE = "▸ ", "▾ ", "  "  # no emoji: width-safe in any terminal

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        for path in paths:
            if path.name.startswith(".") or path.name in SKIPPED_DIRS:
                continue
            if path.is_dir() or path.suffix == ".toml":
                yield path


def check_recipe(path: Path) -> RecipeChecked:
    """Validate without torch: the same load_recipe/expand_sweep the launcher uses."""
    from engine.recipe import RecipeError, expand_sweep, load_recipe

    try:
        recipe = load_recipe(path)
        points = len(expand_sweep(recipe))
    except RecipeError as err:
        return RecipeChecked(str(path), "", error_line(err))
    except Exception as err:  # any surprise is shown in place, never a crash
        return RecipeChecked(str(path), "", f"{shown_path(path)}: {type(err).__name__}: {err}")
    sweep = f", sweep of {points} runs" if points > 1 else ""
    summary = (f"ok: {recipe.run.method}, {recipe.model.arch} on {recipe.data.dataset}, "
               f"{recipe.train.epochs} epochs, device {recipe.train.device}{sweep}")
    return RecipeChecked(str(path), summary, None, points)


class RecipesScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+r", "reload", "reload", key_display="^r")]

    def __init__(self) -> None:
        super().__init__()
        self.current: Path | None = None

    def compose(self) -> ComposeResult:
        root = self.app.recipes_dir  # type: ignore[attr-defined]
        yield Static(f"kdtui · recipes in {root}", id="recipes-title", classes="title")
        with Horizontal(id="recipes-body"):
            yield RecipeTree(root, id="recipe-tree")
            with Vertical(id="recipe-side"):
                yield Static("highlight a recipe to preview it; Enter to launch", id="recipe-status")
                with VerticalScroll(id="recipe-preview-scroll"):
                    yield Static(id="recipe-preview")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one(RecipeTree).focus()

    @on(DirectoryTree.NodeHighlighted)
    def _highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:
        path = getattr(event.node.data, "path", None)
        if path is not None and Path(path).is_file():
            self.current = Path(path)
            self._check(self.current)

    @on(DirectoryTree.FileSelected)
    def _selected(self, event: DirectoryTree.FileSelected) -> None:
        self.current = Path(event.path)
        self.app.open_launch(self.current)  # type: ignore[attr-defined]

    @work(thread=True, exclusive=True, group="recipe-check")
    def _check(self, path: Path) -> None:
        result = check_recipe(path)
        try:
            with open(path, "rb") as handle:
                result.text = handle.read(PREVIEW_LIMIT).decode("utf-8", errors="replace")
        except OSError as err:
            result.text = f"# cannot read {path}: {err}"
        self.post_message(result)

    def on_recipe_checked(self, message: RecipeChecked) -> None:
        if self.current is None or message.path != str(self.current):
            return  # an older check finishing late
        status = self.query_one("#recipe-status", Static)
        if message.error:
            status.update(Text(message.error, style="bold red"))
            status.set_classes("error")
        else:
            status.update(Text(message.summary))
            status.set_classes("ok")
        syntax = Syntax(message.text, "toml", theme="ansi_dark", line_numbers=True,
                        background_color="default", word_wrap=True)
        self.query_one("#recipe-preview", Static).update(syntax)

    def action_reload(self) -> None:
        self.query_one(RecipeTree).reload()
