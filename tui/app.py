"""`kdtui` with no command: the full-screen app. Screens live in tui/screens, one per module.

This module wires them: two modes (runs, recipes), the keys every screen shares, the
command palette entries, and the small glue that opens dialogs and runs actions off the
UI thread. It imports neither torch nor the engine's trainer, only torch-free modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen, Screen

from engine.rundir import RunDir, runs_root
from tui.screens import run_actions
from tui.screens.recipes import RecipesScreen
from tui.screens.runs import RunsScreen

STYLES = Path(__file__).parent / "styles"


class KdtuiApp(App[None]):
    TITLE = "kdtui"
    CSS_PATH: ClassVar = [STYLES / name for name in ("app.tcss", "runs.tcss", "run_view.tcss", "launch.tcss")]
    MODES: ClassVar = {"runs": RunsScreen, "recipes": RecipesScreen}
    DEFAULT_MODE = "runs"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('runs')", "runs"),
        Binding("2", "switch_mode('recipes')", "recipes"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, runs_dir: Path | None = None, recipes_dir: Path | None = None) -> None:
        super().__init__()
        self.runs_dir = runs_root(runs_dir)
        self.recipes_dir = recipes_dir or (Path("recipes") if Path("recipes").is_dir() else Path("."))
        self.runs_screen: RunsScreen | None = None
        self.supervisors: set[int] = set()  # queue supervisors we started: reaped, so none lingers as a zombie

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Global keys do nothing under a dialog (typing '1' in an input must not switch screens)."""
        return not (action in ("switch_mode", "quit") and isinstance(self.screen, ModalScreen))

    def adopt(self, pid: int) -> None:
        self.supervisors.add(pid)

    def reap(self) -> None:
        """A supervisor that exited must not stay a zombie: its pid would still look alive."""
        for pid in list(self.supervisors):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.supervisors.discard(pid)

    def refresh_runs(self) -> None:
        if self.runs_screen is not None:
            self.runs_screen.reload(sync=True)

    # ---------------------------------------------------------------- navigation
    def open_run(self, doc: dict[str, Any]) -> None:
        from tui.screens.run_view import RunViewScreen

        self.push_screen(RunViewScreen(doc))

    def open_compare(self, docs: list[dict[str, Any]]) -> None:
        from tui.screens.compare import CompareScreen

        self.push_screen(CompareScreen(docs))

    def open_diff(self, docs: list[dict[str, Any]]) -> None:
        """The checkpoint diff screen (its own module): A/B from the selected runs, or picked there."""
        try:
            from tui.screens.diff import DiffScreen
        except ImportError as err:
            self.notify(f"checkpoint diff screen not available: {err}", severity="warning")
            return
        refs = [str(doc.get("id")) for doc in docs[:2]]
        self.push_screen(DiffScreen(*refs, runs_dir=self.runs_dir))

    def open_launch(self, recipe: Path, overrides: str = "", title: str | None = None, **kwargs: Any) -> None:
        from tui.screens.launch import LaunchScreen

        self.push_screen(LaunchScreen(recipe, self.runs_dir, overrides, title, **kwargs), self._launched)

    def relaunch(self, doc: dict[str, Any]) -> None:
        """As `kdtui relaunch`: a new run from this run's resolved recipe and device, with typed edits."""
        run = RunDir(Path(str(doc.get("run_dir") or "")))
        if not run.recipe_path.is_file():
            self.notify(f"cannot relaunch {doc.get('name')}: {run.recipe_path} is missing", severity="error")
            return
        info = run.read_info()
        extra = {"parent": run.id, "recipe_path": info.get("recipe_path") or str(run.recipe_path),
                 "recipe_hash": hashlib.sha256(run.recipe_path.read_bytes()).hexdigest()[:16]}
        device = (info.get("launch") or {}).get("device") or info.get("device") or "cpu"
        self.open_launch(run.recipe_path, "# edits, one a line, e.g.\n# optim.lr = 0.05\n",
                         f"Relaunch {doc.get('name')} with edits", devices=[device], extra_info=extra)

    def _launched(self, runs: list[dict[str, Any]] | None) -> None:
        if not runs:
            return
        self.notify(f"launched {len(runs)} run(s): {', '.join(str(r.get('name')) for r in runs[:3])}")
        self.switch_mode("runs")
        self.refresh_runs()
        if len(runs) == 1:
            self.open_run(runs[0])

    # ---------------------------------------------------------------- actions (off the UI thread)
    def run_action_on(self, docs: list[dict[str, Any]], action: str) -> None:
        self._act(docs, action)

    @work(thread=True, group="actions")
    def _act(self, docs: list[dict[str, Any]], action: str) -> None:
        messages = []
        for doc in docs:
            try:
                if action == "stop":
                    messages.append(run_actions.stop(self.runs_dir, doc))
                else:
                    message, pid = run_actions.resume(self.runs_dir, doc)
                    messages.append(message)
                    if pid:
                        self.call_from_thread(self.adopt, pid)
            except Exception as err:  # a failed action is a notification, not a crash
                messages.append(f"{action} {doc.get('name')}: {err}")
        self.call_from_thread(self.notify, "\n".join(messages[:6]))
        self.call_from_thread(self.refresh_runs)

    def edit_tags(self, docs: list[dict[str, Any]]) -> None:
        from tui.screens.dialogs import PromptScreen

        current = " ".join(docs[0].get("tags") or []) if len(docs) == 1 else ""
        prompt = PromptScreen(f"Tags for {len(docs)} run(s): words add, -word removes", current, "best ablation -old")
        self.push_screen(prompt, lambda text: text is not None and self._store_edit(run_actions.set_tags, docs, text))

    def edit_note(self, doc: dict[str, Any]) -> None:
        from tui.screens.dialogs import PromptScreen

        prompt = PromptScreen(f"Note for {doc.get('name')}", str(doc.get("note") or ""))
        self.push_screen(prompt, lambda text: text is not None and self._store_edit(run_actions.set_note, doc, text))

    def delete_runs(self, docs: list[dict[str, Any]]) -> None:
        from tui.screens.dialogs import ConfirmDeleteScreen

        def chosen(choice: str | None) -> None:
            if choice:
                self._store_edit(run_actions.delete, docs, choice == "keep")

        self.push_screen(ConfirmDeleteScreen([str(d.get("name")) for d in docs]), chosen)

    @work(thread=True, group="actions")
    def _store_edit(self, func: Any, *args: Any) -> None:
        try:
            message = func(self.runs_dir, *args)
        except Exception as err:  # a locked store is a notification
            self.call_from_thread(self.notify, str(err), severity="error")
        else:
            self.call_from_thread(self.notify, message)
        self.call_from_thread(self.refresh_runs)

    # ---------------------------------------------------------------- command palette
    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield SystemCommand("Runs", "The run history table (key 1)", lambda: self.switch_mode("runs"))
        yield SystemCommand("Recipes", "Browse and launch recipes (key 2)", lambda: self.switch_mode("recipes"))
        for _key, binding, enabled, _tooltip in screen.active_bindings.values():
            if enabled and binding.show and binding.description:
                yield SystemCommand(binding.description.capitalize(), f"key {binding.key}",
                                    lambda action=binding.action: self.run_action(action, screen))
        for recipe in sorted(self.recipes_dir.rglob("*.toml"))[:200]:
            yield SystemCommand(f"Launch {recipe}", "open the launch dialog", lambda r=recipe: self.open_launch(r),
                                discover=False)
        if self.runs_screen is not None:
            for doc in self.runs_screen.table.rows[:500]:
                yield SystemCommand(f"Open run {doc.get('name')} ({doc.get('id')})", str(doc.get("status")),
                                    lambda d=doc: self.open_run(d), discover=False)
        yield from super().get_system_commands(screen)


def run_app(runs_dir: Path | None = None, recipes_dir: Path | None = None) -> None:
    """Open the app; runs it launched keep going after it quits (they are in their own sessions)."""
    with contextlib.suppress(ImportError):  # textual-image (diff screen) queries the terminal: before run()
        import tui.screens.diff  # noqa: F401
    KdtuiApp(runs_dir, recipes_dir).run()
