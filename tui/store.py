"""Run history: `runs/kdtui.json`, one small TinyDB document per run, rebuilt from run dirs at will.

The run directories are the source of truth; this file is a searchable index of them.
TinyDB is not safe across processes, so every write holds one inter-process file lock
(`kdtui.json.lock`) and replaces the file atomically (temp file + os.replace): a reader never
sees a torn file, and readers need no lock. Torch-free.

Document fields (stable; `kdtui runs --json` prints a list of these, `kdtui show --json` one):
id, name, status, method, arch, dataset, device, pid, host, run_dir, recipe_path, recipe_hash,
params (the resolved recipe as dotted keys), epoch, epochs, step, best (metric -> value, plus
`epoch` and `metric`), last (latest eval metrics), created, started, ended (unix seconds),
tags, note, error, git_commit, sweep_point, parent (id this run was relaunched from), and
`synced` (internal: the run files' mtime the document reflects).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from tinydb import Query, TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from engine.errors import UserError
from engine.rundir import RunDir, atomic_write_text, effective_status, iter_run_dirs

STORE_FILE = "kdtui.json"
TABLE = "runs"
ANNOTATIONS = "annotations.json"  # per run: user tags and note (kdtui tag / note, the TUI)
ACTIVE = ("queued", "running")
LOCK_TIMEOUT_S = 60.0


class StoreError(UserError):
    """kdtui.json cannot be used; the message says how to rebuild it."""


class AtomicJSONStorage(Storage):
    """TinyDB storage that writes a temp file and renames it; an unreadable file is a StoreError."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise _corrupt(self.path, type(err).__name__) from None
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise _corrupt(self.path, f"invalid JSON at line {err.lineno} column {err.colno}") from None
        if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
            raise _corrupt(self.path, "not a TinyDB document table")
        return data

    def write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, separators=(",", ":"), default=str))


def _corrupt(path: Path, reason: str) -> StoreError:
    return StoreError(f"{path}: unreadable run store ({reason}); rebuild it from the run directories "
                      f"with `kdtui runs --rebuild`")


class RunStore:
    """The run history of one runs root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STORE_FILE
        self.lock = FileLock(str(self.root / f"{STORE_FILE}.lock"), timeout=LOCK_TIMEOUT_S)

    # ---------------------------------------------------------------- plumbing
    def _locked(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.lock

    def _table(self) -> tuple[TinyDB, Table]:
        db = TinyDB(self.path, storage=AtomicJSONStorage)
        return db, db.table(TABLE, cache_size=0)  # no query cache: other processes write too

    def _write(self, func: Any) -> Any:
        """Run func(table) holding the lock (one writer at a time across processes)."""
        try:
            with self._locked():
                db, table = self._table()
                try:
                    return func(table)
                finally:
                    db.close()
        except Timeout:
            raise StoreError(f"{self.lock.lock_file}: run store locked for over {LOCK_TIMEOUT_S:.0f} s "
                             f"by another process") from None

    def _write_all(self, docs: list[dict[str, Any]]) -> None:
        """Replace the whole table in one write (caller holds the lock)."""
        AtomicJSONStorage(self.path).write({TABLE: {str(i): doc for i, doc in enumerate(docs, start=1)}})

    # ---------------------------------------------------------------- API
    def upsert(self, doc: dict[str, Any]) -> None:
        """Insert or replace the document whose `id` is doc['id']."""
        self._write(lambda t: t.upsert(doc, Query().id == doc["id"]))

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields on one document; a run not in the store is left alone."""
        self._write(lambda t: t.update(fields, Query().id == run_id))

    def get(self, run_id: str) -> dict[str, Any] | None:
        return next((doc for doc in self.all() if doc.get("id") == run_id), None)

    def all(self) -> list[dict[str, Any]]:
        """Every document, oldest id first (a lock-free read: files are replaced atomically)."""
        data = AtomicJSONStorage(self.path).read() or {}
        docs = [dict(doc) for doc in data.get(TABLE, {}).values() if isinstance(doc, dict) and "id" in doc]
        return sorted(docs, key=lambda d: str(d["id"]))

    def query(self, status: str | None = None, method: str | None = None, tag: str | None = None,
              text: str | None = None, sort: str | None = None, descending: bool = True) -> list[dict[str, Any]]:
        """Filter (all given conditions hold) and sort by a field or a metric (best, then last, then params)."""
        docs = self.all()
        if status:
            docs = [d for d in docs if d.get("status") == status]
        if method:
            docs = [d for d in docs if d.get("method") == method]
        if tag:
            docs = [d for d in docs if tag in (d.get("tags") or [])]
        if text:
            needle = text.lower()
            docs = [d for d in docs if needle in _haystack(d)]
        return sort_docs(docs, sort, descending) if sort else docs

    def remove(self, run_id: str) -> None:
        self._write(lambda t: t.remove(Query().id == run_id))

    def sync(self) -> list[dict[str, Any]]:
        """Reconcile with the run directories and return every document.

        Refreshes documents of active runs and of runs whose files changed (a dead pid turns
        `running` into `interrupted`), adds directories the store lacks and drops documents
        whose directory is gone. Writes only when something changed.
        """
        def reconcile(table: Table) -> list[dict[str, Any]]:
            docs = {doc["id"]: dict(doc) for doc in table.all() if "id" in doc}
            changed = False
            seen = set()
            for run in iter_run_dirs(self.root):
                seen.add(run.id)
                old = docs.get(run.id)
                if old is None or old.get("status") in ACTIVE or old.get("synced") != files_stamp(run):
                    new = doc_from_run(run)
                    if new != old:
                        docs[run.id], changed = new, True
            for run_id in [i for i in docs if i not in seen]:
                if not Path(str(docs[run_id].get("run_dir", ""))).exists():
                    del docs[run_id]
                    changed = True
            result = sorted(docs.values(), key=lambda d: str(d["id"]))
            if changed:
                self._write_all(result)
            return result

        if not self.root.is_dir():
            return []
        return self._write(reconcile)

    def rebuild(self) -> int:
        """Recreate kdtui.json from the run directories alone (a corrupt store is simply replaced)."""
        docs = [doc_from_run(run) for run in iter_run_dirs(self.root)]
        try:
            with self._locked():
                self._write_all(docs)
        except Timeout:
            raise StoreError(f"{self.lock.lock_file}: run store locked by another process") from None
        return len(docs)


# ---------------------------------------------------------------- documents


def doc_from_run(run: RunDir) -> dict[str, Any]:
    """The store document for one run directory (see the module docstring for the fields)."""
    info = run.read_info()
    notes = read_annotations(run)
    try:
        params = flatten(tomllib.loads(run.recipe_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        params = {}
    params.pop("sweep", None)
    status = effective_status(info) if info else "failed"
    return {
        "id": run.id,
        "name": info.get("name") or run.id,
        "status": status,
        "method": info.get("method"),
        "arch": info.get("arch"),
        "dataset": info.get("dataset"),
        "device": info.get("device"),
        "pid": info.get("pid"),
        "host": info.get("host"),
        "run_dir": str(run.path.resolve()),
        "recipe_path": info.get("recipe_path"),
        "recipe_hash": info.get("recipe_hash"),
        "params": params,
        "epoch": info.get("epoch", 0),
        "epochs": info.get("epochs"),
        "step": info.get("step", 0),
        "best": info.get("best") or {},
        "last": info.get("last") or {},
        "created": info.get("created"),
        "started": info.get("started"),
        "ended": info.get("ended"),
        "tags": notes.get("tags", info.get("tags") or []),
        "note": notes.get("note", info.get("note") or ""),
        "error": info.get("error") or (None if info else "run.json is missing or unreadable"),
        "git_commit": info.get("git_commit"),
        "sweep_point": info.get("sweep_point") or {},
        "parent": info.get("parent"),
        "synced": files_stamp(run),
    }


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def files_stamp(run: RunDir) -> float:
    """Latest mtime of the files a document is made from (a changed stamp means refresh)."""
    stamps = []
    for path in (run.info_path, run.path / ANNOTATIONS):
        try:
            stamps.append(os.stat(path).st_mtime_ns / 1e9)
        except OSError:
            continue
    return max(stamps, default=0.0)


def read_annotations(run: RunDir) -> dict[str, Any]:
    """User tags and note: kept beside run.json, which only the engine and launcher write."""
    try:
        data = json.loads((run.path / ANNOTATIONS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_annotations(run: RunDir, **fields: Any) -> dict[str, Any]:
    info = run.read_info()
    data = {"tags": list(info.get("tags") or []), "note": info.get("note") or "", **read_annotations(run), **fields}
    atomic_write_text(run.path / ANNOTATIONS, json.dumps(data, indent=2))
    return data


def metric_value(doc: dict[str, Any], key: str) -> Any:
    """A sortable value: a top-level field, else best[key], last[key], params[key]."""
    value = doc.get(key)
    if value is not None and not isinstance(value, dict | list):
        return value
    for section in ("best", "last", "params"):
        found = (doc.get(section) or {}).get(key)
        if found is not None:
            return found
    return None


def sort_docs(docs: list[dict[str, Any]], key: str, descending: bool = True) -> list[dict[str, Any]]:
    """Sorted by metric_value; documents without the value always come last."""
    have = [d for d in docs if isinstance(metric_value(d, key), int | float | str)]
    missing = [d for d in docs if d not in have]
    try:
        have.sort(key=lambda d: metric_value(d, key), reverse=descending)
    except TypeError:  # mixed numbers and strings
        have.sort(key=lambda d: str(metric_value(d, key)), reverse=descending)
    return have + missing


def _haystack(doc: dict[str, Any]) -> str:
    parts = [doc.get(k) or "" for k in ("id", "name", "note", "method", "arch", "dataset", "device", "status")]
    return " ".join([*map(str, parts), *map(str, doc.get("tags") or [])]).lower()
