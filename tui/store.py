"""Run history: `runs/kdtui.json`, one small TinyDB document per run, rebuilt from run dirs at will.

The run directories are the source of truth; this file is a searchable index of them.
The file is TinyDB's format (`{"runs": {doc_id: document}}`, readable with
`TinyDB(path, storage=AtomicJSONStorage)`). TinyDB is not safe across processes, so every
write holds one inter-process lock (`kdtui.json.lock`), reads and writes the file once,
and replaces it atomically (temp file + os.replace): a reader never sees a torn file, and
readers need no lock. Torch-free.

The runs root may sit on a filesystem shared by many machines (SLURM array tasks finishing
on different nodes record their end here at once). fcntl/flock locks do not reliably exclude
other NFS clients, so the lock is `tui.netlock.NetLock`, built on link(2) with stale-lock
recovery, and a write is committed only after checking the lock is still ours. Nodes also
write only their own run directories otherwise: if a node's store update fails, `sync()`
(every `kdtui runs`, the TUI) catches up from the run directories, which stay the truth.

Document fields (stable; `kdtui runs --json` prints a list of these, `kdtui show --json` one):
id, name, status, method, arch, dataset, device, pid, host, run_dir, recipe_path, recipe_hash,
params (the resolved recipe as dotted keys: STABLE_PARAMS always, other keys only where they
differ from the schema default, to keep documents small), epoch, epochs, step, best (metric ->
value, plus `epoch` and `metric`), last (latest eval metrics), created, started, ended (unix
seconds), tags, note, error, git_commit, sweep_point, parent (id this run was relaunched from),
slurm_job (JOBID_TASK of a `kdtui slurm --submit` array task, else None), and `synced`
(internal: the run files' mtime the document reflects).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinydb.storages import Storage

from engine.errors import UserError
from engine.rundir import RunDir, atomic_write_text, effective_status, iter_run_dirs
from tui.netlock import LockLost, LockTimeout, NetLock

STORE_FILE = "kdtui.json"
TABLE = "runs"
ANNOTATIONS = "annotations.json"  # per run: user tags and note (kdtui tag / note, the TUI)
ACTIVE = ("queued", "running")
LOCK_TIMEOUT_S = 60.0
STABLE_PARAMS = ("run.name", "run.method", "data.dataset", "data.root", "data.batch_size", "data.scale", "model.arch",
                 "optim.name", "optim.lr", "schedule.name", "train.epochs", "train.seed", "train.device",
                 "checkpoint.every")  # DESIGN.md: keys scripts rely on; always in `params`
_MISSING = object()


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
        """Temp file + os.replace: readers see the old or the new file, never a mix. No fsync: the
        index is rebuilt from the run directories if a power cut ever leaves it unreadable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(data, separators=(",", ":"), default=str))  # dumps: the C encoder
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _corrupt(path: Path, reason: str) -> StoreError:
    return StoreError(f"{path}: unreadable run store ({reason}); rebuild it from the run directories "
                      f"with `kdtui runs --rebuild`")


class RunStore:
    """The run history of one runs root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / STORE_FILE
        self.lock = NetLock(self.root / f"{STORE_FILE}.lock", timeout=LOCK_TIMEOUT_S)

    def _modify(self, change: Callable[[dict[str, dict[str, Any]]], bool],
                replace: dict[str, Any] | None = None) -> None:
        """Holding the lock: read the table (doc_id -> document) once, let `change` edit it in place,
        write it once if it returns True. (TinyDB's own upsert rewrites the file up to three times.)
        `replace` writes that data without reading the file (rebuild: the old file may be corrupt)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with self.lock:
                storage = AtomicJSONStorage(self.path)
                data = replace if replace is not None else storage.read() or {}
                table = data.setdefault(TABLE, {})
                if change(table):
                    self.lock.verify()  # frozen past the stale limit and broken? then write nothing
                    storage.write(data)
        except LockTimeout as err:
            raise StoreError(f"{err}: run store busy; try again") from None
        except LockLost as err:
            raise StoreError(str(err)) from None

    # ---------------------------------------------------------------- API
    def upsert(self, doc: dict[str, Any]) -> None:
        """Insert or replace the document whose `id` is doc['id']."""
        def change(table: dict[str, dict[str, Any]]) -> bool:
            key = _key_of(table, doc["id"]) or str(max(map(int, table), default=0) + 1)
            table[key] = doc
            return True

        self._modify(change)

    def upsert_many(self, docs: list[dict[str, Any]]) -> None:
        """upsert() for many documents with one lock and one write (a 1000-point sweep is one write)."""
        def change(table: dict[str, dict[str, Any]]) -> bool:
            keys = {doc.get("id"): key for key, doc in table.items() if isinstance(doc, dict)}
            top = max(map(int, table), default=0)
            for doc in docs:
                key = keys.get(doc["id"])
                if key is None:
                    top += 1
                    key = keys[doc["id"]] = str(top)
                table[key] = doc
            return bool(docs)

        self._modify(change)

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields on one document; a run not in the store is left alone."""
        def change(table: dict[str, dict[str, Any]]) -> bool:
            key = _key_of(table, run_id)
            if key is not None:
                table[key] = {**table[key], **fields}
            return key is not None

        self._modify(change)

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
        self._modify(lambda table: table.pop(_key_of(table, run_id) or "", None) is not None)

    def sync(self) -> list[dict[str, Any]]:
        """Reconcile with the run directories and return every document.

        Refreshes documents of active runs and of runs whose files changed (a dead pid turns
        `running` into `interrupted`), adds directories the store lacks and drops documents
        whose directory is gone. Writes only when something changed.
        """
        result: list[dict[str, Any]] = []

        def reconcile(table: dict[str, dict[str, Any]]) -> bool:
            docs = {doc["id"]: doc for doc in table.values() if isinstance(doc, dict) and "id" in doc}
            changed, seen = False, set()
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
            result.extend(sorted(docs.values(), key=lambda d: str(d["id"])))
            if changed:
                table.clear()
                table.update({str(i): doc for i, doc in enumerate(result, start=1)})
            return changed

        if self.root.is_dir():
            _default_params()  # its first call imports the recipe schema: not while holding the lock
            self._modify(reconcile)
        return result

    def rebuild(self) -> int:
        """Recreate kdtui.json from the run directories alone (a corrupt store is simply replaced)."""
        docs = [doc_from_run(run) for run in iter_run_dirs(self.root)]
        self._modify(lambda table: True, replace={TABLE: {str(i): doc for i, doc in enumerate(docs, start=1)}})
        return len(docs)


def _key_of(table: dict[str, dict[str, Any]], run_id: str) -> str | None:
    return next((key for key, doc in table.items() if isinstance(doc, dict) and doc.get("id") == run_id), None)


# ---------------------------------------------------------------- documents


def doc_from_run(run: RunDir) -> dict[str, Any]:
    """The store document for one run directory (see the module docstring for the fields)."""
    info = run.read_info()
    notes = read_annotations(run)
    try:
        params = recipe_params(tomllib.loads(run.recipe_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        params = {}
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
        "slurm_job": info.get("slurm_job"),
        "synced": files_stamp(run),
    }


def recipe_params(recipe: dict[str, Any]) -> dict[str, Any]:
    """The resolved recipe as dotted keys, small: the stable keys plus every value that differs
    from the schema default (absent = default; `engine.recipe.Recipe()` has them all)."""
    defaults = _default_params()
    return {key: value for key, value in flatten(recipe).items()
            if key in STABLE_PARAMS or (key != "sweep" and defaults.get(key, _MISSING) != value)}


@functools.cache
def _default_params() -> dict[str, Any]:
    from engine.recipe import Recipe

    return flatten(Recipe().to_dict())


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
    keyed = [(metric_value(d, key), d) for d in docs]
    have = [(v, d) for v, d in keyed if isinstance(v, int | float | str) and not isinstance(v, bool)]
    missing = [d for v, d in keyed if not (isinstance(v, int | float | str) and not isinstance(v, bool))]
    try:
        have.sort(key=lambda pair: pair[0], reverse=descending)
    except TypeError:  # mixed numbers and strings
        have.sort(key=lambda pair: str(pair[0]), reverse=descending)
    return [d for _, d in have] + missing


def _haystack(doc: dict[str, Any]) -> str:
    parts = [doc.get(k) or "" for k in ("id", "name", "note", "method", "arch", "dataset", "device", "status")]
    return " ".join([*map(str, parts), *map(str, doc.get("tags") or [])]).lower()
