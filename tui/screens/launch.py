"""Launch dialog: pick devices, edit `key = value` overrides, see the sweep size, launch detached.

Runs start through the run manager's launch path (the same code as `kdtui run --detach`), so
the dialog has no launcher of its own and quitting the app never stops a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, SelectionList, Static, TextArea
from textual.widgets.selection_list import Selection

from tui.widgets.format import error_line, shown_path
from tui.widgets.key_footer import KeyFooter

CHECK_DELAY_S = 0.3


@dataclass
class Plan:
    """What pressing launch would do, or why it cannot."""

    runs: int = 0
    text: str = ""
    error: str | None = None


def parse_overrides(text: str) -> list[str]:
    """`section.key = value` lines (blank lines and # comments skipped) -> ['section.key=value', ...]."""
    overrides = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        overrides.append(f"{key.strip()}={value.strip()}" if sep else line)
    return overrides


def device_choices() -> list[tuple[str, str, bool]]:
    """(label, device string, selected by default): CPU, each CUDA device, and multi-device groups."""
    from tui.devices import detect_devices

    devices = detect_devices()
    cuda = [d for d in devices if d.kind == "cuda"]
    cores = next((d.cores for d in devices if d.kind == "cpu"), None) or os.cpu_count() or 1
    choices = [(f"cpu  ({cores} cores)", "cpu", not cuda)]
    for device in cuda:
        free = f"{device.memory_free_mb:,} MiB free of {device.memory_total_mb:,}" if device.memory_total_mb else ""
        choices.append((f"cuda:{device.index}  {device.name}  {free}".rstrip(), f"cuda:{device.index}",
                        device.index == cuda[0].index))
    indexes = [d.index for d in cuda]
    groups = [indexes] if len(indexes) >= 2 else []
    if len(indexes) >= 4:
        groups += [indexes[i:i + 2] for i in range(0, len(indexes) - 1, 2)]
    for group in groups:
        spec = "cuda:" + ",".join(map(str, group))
        choices.append((f"{spec}  one job on {len(group)} GPUs (DDP)", spec, False))
    if cores >= 2:
        choices.append(("cpu*2  one job, 2 processes (DDP with gloo)", "cpu*2", False))
    return choices


def plan(recipe: Path, overrides: list[str], devices: list[str], runs_dir: Path) -> Plan:
    """Validate exactly as launching would (recipe, overrides, devices), without creating anything."""
    from tui.devices import parse_device_spec
    from tui.launcher import prepare

    specs = [parse_device_spec(device) for device in devices]
    prepared = prepare(recipe, overrides, runs_dir)
    runs = len(prepared.points)
    what = f"{runs} runs (sweep over {', '.join(prepared.recipe.sweep)})" if runs > 1 else "1 run"
    where = ", ".join(spec.text for spec in specs)
    queue = "; one at a time per device" if runs > len(specs) else ""
    return Plan(runs, f"{what} of {prepared.recipe.run.method} {prepared.recipe.model.arch} on {where}{queue}")


def launch(recipe: Path, overrides: list[str], devices: list[str], runs_dir: Path,
           extra_info: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], int]:
    """The run manager's queue entry point (as `kdtui run --detach`): queued runs and a detached
    supervisor that starts them through the launcher. Returns their run.json dicts and its pid."""
    from tui.devices import parse_device_spec
    from tui.launcher import prepare
    from tui.queue import submit

    specs = [parse_device_spec(device) for device in devices]
    runs, queue_pid = submit(prepare(recipe, overrides, runs_dir), specs, runs_dir, extra_info=extra_info)
    return [run.read_info() for run in runs], queue_pid


class LaunchScreen(ModalScreen[list[dict[str, Any]] | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+l", "launch", "launch", key_display="^l", priority=True),
        Binding("escape", "cancel", "cancel", key_display="esc"),
    ]

    def __init__(self, recipe: Path, runs_dir: Path, overrides: str = "", title: str | None = None,
                 devices: list[str] | None = None, extra_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.recipe, self.runs_dir = recipe, runs_dir
        self.overrides_text = overrides
        self.wanted_devices = devices  # preselected (a relaunch keeps its run's device)
        self.extra_info = extra_info
        self.title_text = title or f"Launch {shown_path(recipe)}"
        self.plan = Plan(error="checking...")
        self.generation, self.checking, self.launch_requested = 0, True, False
        self.launching = False

    def compose(self) -> ComposeResult:
        with Vertical(id="launch-dialog", classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield Label("devices: space toggles; a sweep's runs are queued over the selected devices")
            yield SelectionList[str](id="launch-devices")
            yield Label("overrides: one `section.key = value` a line")
            yield TextArea(self.overrides_text, id="launch-overrides", soft_wrap=True, compact=True)
            yield Static("checking...", id="launch-summary")
            with Horizontal(id="launch-buttons"):
                yield Button("launch ^l", variant="primary", id="launch-go", compact=True)
                yield Button("cancel esc", id="launch-cancel", compact=True)
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one("#launch-devices", SelectionList).focus()
        self._detect()

    @work(thread=True, exclusive=True, group="devices")
    def _detect(self) -> None:
        try:
            choices = device_choices()
        except Exception as err:  # detection trouble leaves the CPU usable
            choices = [(f"cpu  (device detection failed: {err})", "cpu", True)]
        self.app.call_from_thread(self._show_devices, choices)

    def _show_devices(self, choices: list[tuple[str, str, bool]]) -> None:
        if not self.is_attached:  # a worker finishing after the screen closed
            return
        devices = self.query_one("#launch-devices", SelectionList)
        devices.clear_options()
        if self.wanted_devices:
            known = {value for _, value, _ in choices}
            choices = [(label, value, value in self.wanted_devices) for label, value, _ in choices]
            choices += [(f"{d}  (this run's device; not detected here)", d, True) for d in self.wanted_devices
                        if d not in known]
        devices.add_options([Selection(label, value, selected) for label, value, selected in choices])
        self._schedule_check()

    @on(SelectionList.SelectedChanged)
    @on(TextArea.Changed)
    def _schedule_check(self) -> None:
        self.generation += 1
        self.plan, self.checking = Plan(error="checking..."), True
        self._check(self.generation)

    def _inputs(self) -> tuple[list[str], list[str]]:
        devices = list(self.query_one("#launch-devices", SelectionList).selected)
        return parse_overrides(self.query_one("#launch-overrides", TextArea).text), devices

    @work(thread=True, exclusive=True, group="check")
    def _check(self, generation: int) -> None:
        import time

        time.sleep(CHECK_DELAY_S)  # debounce typing; an exclusive worker replaces this one
        overrides, devices = self.app.call_from_thread(self._inputs)
        try:
            result = plan(self.recipe, overrides, devices, self.runs_dir) if devices else Plan(error="pick a device")
        except Exception as err:  # RecipeError, device errors: shown, never raised
            result = Plan(error=error_line(err))
        self.app.call_from_thread(self._show_plan, result, generation)

    def _show_plan(self, result: Plan, generation: int | None = None) -> None:
        if not self.is_attached or generation not in (None, self.generation):
            return  # the screen closed, or the inputs changed since this check started
        self.plan = result
        self.checking = generation is None and self.checking
        summary = self.query_one("#launch-summary", Static)
        if result.error:
            summary.update(Text(result.error, style="bold red"))
        else:
            summary.update(Text(result.text, style="bold"))
        self.query_one("#launch-go", Button).disabled = bool(result.error)
        if self.launch_requested and not self.checking:
            self.launch_requested = False
            self.action_launch()

    @on(Button.Pressed, "#launch-go")
    def action_launch(self) -> None:
        if self.launching:
            return
        if self.checking:  # pressed while the last edit is being validated: launch once it passes
            self.launch_requested = True
            return
        if self.plan.error:
            self.notify(self.plan.error, severity="warning")
            return
        self.launching = True
        self._launch(*self._inputs())

    @work(thread=True, exclusive=True, group="launch")
    def _launch(self, overrides: list[str], devices: list[str]) -> None:
        try:
            runs, queue_pid = launch(self.recipe, overrides, devices, self.runs_dir, self.extra_info)
        except Exception as err:  # shown in the dialog; nothing half-started
            self.app.call_from_thread(self._failed, error_line(err))
            return
        self.app.call_from_thread(self.app.adopt, queue_pid)  # type: ignore[attr-defined]
        self.app.call_from_thread(self.dismiss, runs)

    def _failed(self, error: str) -> None:
        self.launching = False
        self._show_plan(Plan(error=error))

    @on(Button.Pressed, "#launch-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
