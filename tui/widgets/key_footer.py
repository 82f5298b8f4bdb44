"""A footer that wraps its keys onto as many lines as it needs, so every action stays visible at 80x24."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


class KeyFooter(Footer):
    """Textual's Footer in grid form: columns chosen so all keys fit the terminal's width."""

    def __init__(self) -> None:
        super().__init__(compact=True, show_command_palette=True)
        self._width = 0

    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        keys = [w for w in widgets if isinstance(w, FooterKey) and not w.has_class("-command-palette")]
        self._width = self.app.size.width
        if keys:
            width = max(self._width - 13, 20)  # room for the docked palette key
            cell = max(len(k.key_display) + len(k.description) + 3 for k in keys)  # space, gutter, slack
            columns = max(1, min(len(keys), width // cell))
            rows = -(-len(keys) // columns)
            columns = -(-len(keys) // rows)  # balance the rows
            self.styles.grid_size_columns = columns
            self.styles.height = rows
        yield from widgets

    def on_resize(self) -> None:
        if self.app.size.width != self._width:
            self.call_after_refresh(self.recompose)
