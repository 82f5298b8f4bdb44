"""What the run keys do (stop, resume, tag, note, delete), run off the UI thread.

Thin on purpose: each one goes through the run manager's own code (the store, the launcher's
spawn), so the app and the CLI cannot disagree about what stopping or resuming means.
Every function returns a one-line message for a notification instead of raising.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from engine.rundir import RunDir, effective_status


def _run(doc: dict[str, Any]) -> RunDir:
    return RunDir(Path(str(doc.get("run_dir") or "")))


def _name(doc: dict[str, Any]) -> str:
    return str(doc.get("name") or doc.get("id") or "?")


def stop(root: Path, doc: dict[str, Any]) -> str:
    """SIGTERM to the run's process group: it finishes its step, writes last.pt, becomes `interrupted`.
    A run still waiting in the queue is taken out of it (the supervisor skips non-queued runs)."""
    from tui.store import RunStore, doc_from_run

    run = _run(doc)
    info = run.read_info() or doc
    status = effective_status(info)
    if status == "queued":
        run.update_info(status="interrupted", error="stopped before it started", ended=time.time())
        RunStore(root).upsert(doc_from_run(run))
        return f"{_name(doc)} taken out of the queue"
    if status != "running":
        return f"{_name(doc)} is {status}, not running"
    try:
        os.killpg(int(info["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return f"{_name(doc)}: its process is already gone"
    except (PermissionError, KeyError, TypeError, ValueError) as err:
        return f"{_name(doc)}: cannot stop pid {info.get('pid')}: {err}"
    return f"stopping {_name(doc)}: it saves last.pt and becomes interrupted"


def resume(root: Path, doc: dict[str, Any]) -> str:
    """Queue the run again through the run manager (from last.pt when it has one), as `kdtui resume`."""
    from tui.queue import submit_resume

    run = _run(doc)
    info = run.read_info()
    if not info:
        return f"{_name(doc)}: no readable run.json in {run.path}"
    status = effective_status(info)
    if status in ("running", "queued", "finished"):  # checked here: submit_resume would print to the terminal
        return f"{_name(doc)} is {status}; nothing to resume"
    has_last = (run.checkpoints / "last.pt").exists()
    submit_resume(run, root)
    return f"resuming {_name(doc)}" + ("" if has_last else " from the start (no last.pt)")


def set_tags(root: Path, docs: list[dict[str, Any]], text: str) -> str:
    """'a b -c': add a and b, remove c. Kept in the run folder's annotations and in the store."""
    words = text.replace(",", " ").split()
    add = [w for w in words if not w.startswith("-")]
    drop = {w[1:] for w in words if w.startswith("-")}
    for doc in docs:
        tags = [t for t in (doc.get("tags") or []) if t not in drop]
        tags += [t for t in add if t not in tags]
        _annotate(root, doc, tags=tags)
    return f"tags updated on {len(docs)} run(s)"


def set_note(root: Path, doc: dict[str, Any], note: str) -> str:
    _annotate(root, doc, note=note)
    return f"note saved on {_name(doc)}"


def delete(root: Path, docs: list[dict[str, Any]], keep_files: bool) -> str:
    """Forget runs (and delete their folders unless `keep_files`); running ones are left alone."""
    from tui.store import RunStore

    store = RunStore(root)
    removed = 0
    for doc in docs:
        run = _run(doc)
        if effective_status(run.read_info() or doc) in ("running", "queued"):
            continue
        if not keep_files and run.info_path.exists():
            shutil.rmtree(run.path, ignore_errors=True)
        store.remove(doc["id"])
        removed += 1
    skipped = len(docs) - removed
    return f"deleted {removed} run(s)" + (f"; {skipped} still running or queued (stop them first)" if skipped else "")


def _annotate(root: Path, doc: dict[str, Any], **fields: Any) -> None:
    """Tags and notes live beside run.json (annotations.json), which only the engine writes."""
    from tui.store import RunStore, write_annotations

    run = _run(doc)
    if run.path.is_dir():
        write_annotations(run, **fields)
    RunStore(root).update(doc["id"], **fields)
    doc.update(fields)
