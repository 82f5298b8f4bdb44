"""What the run keys do (stop, resume, tag, note, delete), run off the UI thread.

Thin on purpose: each one is the run manager's own code (tui/queue.py, tui/store.py) used the
way `kdtui stop/resume/tag/note/rm` use it, so the app and the CLI cannot disagree about what
stopping or resuming means. Every function returns a one-line message for a notification;
a refused action (a finished run cannot resume) is a message, not an exception.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.rundir import RunDir, effective_status


def _run(doc: dict[str, Any]) -> RunDir:
    return RunDir(Path(str(doc.get("run_dir") or "")))


def _record(root: Path, run: RunDir) -> None:
    from tui.store import RunStore, doc_from_run

    if run.info_path.exists():
        RunStore(root).upsert(doc_from_run(run))


def stop(root: Path, doc: dict[str, Any]) -> str:
    """SIGTERM to the run's process group (it checkpoints, becomes `interrupted`), or take it out of the queue."""
    from tui.queue import stop_run

    run = _run(doc)
    try:
        message = stop_run(run)
    except UserError as err:
        return str(err)
    _record(root, run)
    return message


def resume(root: Path, doc: dict[str, Any]) -> tuple[str, int | None]:
    """Queue the run again (from checkpoints/last.pt when it has one), as `kdtui resume`.
    Returns the message and the pid of the queue supervisor started for it."""
    from tui.queue import submit_resume

    run = _run(doc)
    has_last = (run.checkpoints / "last.pt").exists()
    try:
        pid = submit_resume(run, root)
    except UserError as err:
        return str(err), None
    return f"{run.id}: resuming" + (" from last.pt" if has_last else " from the start (no last.pt)"), pid


def set_tags(root: Path, docs: list[dict[str, Any]], text: str) -> str:
    """'a b -c': add a and b, remove c. Kept beside run.json (annotations.json) and in the store."""
    from tui.store import read_annotations, write_annotations

    words = text.replace(",", " ").split()
    add = [w[:64] for w in words if not w.startswith("-")]
    drop = {w[1:] for w in words if w.startswith("-")}
    for doc in docs:
        run = _run(doc)
        if not run.info_path.exists():
            continue
        tags = [t for t in read_annotations(run).get("tags", doc.get("tags") or []) if t not in drop]
        tags += [t for t in add if t not in tags]
        write_annotations(run, tags=tags)
        _record(root, run)
    return f"tags updated on {len(docs)} run(s)"


def set_note(root: Path, doc: dict[str, Any], note: str) -> str:
    from tui.store import write_annotations

    run = _run(doc)
    if not run.info_path.exists():
        return f"{doc.get('id')}: its run directory is missing"
    write_annotations(run, note=note[:2000])
    _record(root, run)
    return f"{run.id}: note {'set' if note else 'cleared'}"


def delete(root: Path, docs: list[dict[str, Any]], keep_files: bool) -> str:
    """As `kdtui rm [--keep-files]`: delete the folder (or move it to RUNS/removed/), forget the run.
    Queued and running runs are left alone."""
    from tui.store import RunStore

    store = RunStore(root)
    removed, busy = 0, []
    for doc in docs:
        run = _run(doc)
        if effective_status(run.read_info() or doc) in ("queued", "running"):
            busy.append(run.id)
            continue
        if run.path.is_dir() and run.info_path.exists():
            if keep_files:
                target = root / "removed" / run.id
                target.parent.mkdir(parents=True, exist_ok=True)
                run.path.rename(target)
            else:
                shutil.rmtree(run.path)
        store.remove(str(doc.get("id")))
        removed += 1
    where = f" (folders moved to {root / 'removed'})" if keep_files and removed else ""
    return f"removed {removed} run(s){where}" + (f"; {len(busy)} queued or running: stop them first" if busy else "")
