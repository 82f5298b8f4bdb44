"""Small modal dialogs: a one-line text prompt (tag, note) and a delete confirmation."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from tui.widgets.key_footer import KeyFooter


class PromptScreen(ModalScreen[str | None]):
    """Enter returns the text, Escape returns None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel", key_display="esc")]

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text, self.value, self.placeholder = title, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield Input(self.value, placeholder=self.placeholder, id="prompt-input")
            yield Static("Enter to save · Esc to cancel", classes="dialog-help")
        yield KeyFooter()

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDeleteScreen(ModalScreen[str | None]):
    """'files' (delete the run folders), 'keep' (move them to RUNS/removed/) or None."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "choose('files')", "delete with files"),
        Binding("k", "choose('keep')", "keep folders"),
        Binding("escape,n", "choose(None)", "cancel", key_display="esc"),
    ]

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def compose(self) -> ComposeResult:
        shown = ", ".join(self.names[:5]) + (f" and {len(self.names) - 5} more" if len(self.names) > 5 else "")
        with Vertical(classes="dialog"):
            yield Static(f"Delete {len(self.names)} run(s)?", classes="dialog-title")
            yield Static(shown)
            yield Static("y: delete the runs and their folders · k: forget them, move the folders to "
                         "removed/ · Esc: cancel", classes="dialog-help")
        yield KeyFooter()

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)
