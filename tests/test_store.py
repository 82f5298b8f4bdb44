"""The run history (tui/store.py): concurrent writers, reconciliation with run dirs, rebuild, queries."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir import RunDir, create_run_dir
from tui.store import RunStore, StoreError, doc_from_run, write_annotations

DOC_FIELDS = {"id", "name", "status", "method", "arch", "dataset", "device", "pid", "host", "run_dir", "recipe_path",
              "recipe_hash", "params", "epoch", "epochs", "best", "last", "created", "started", "ended", "tags",
              "note", "error", "git_commit"}
RECIPE = '[run]\nname = "r"\nmethod = "supervised"\n[optim]\nlr = 0.1\n[train]\nepochs = 3\n'


def make_run(root: Path, name: str = "r", **info: object) -> RunDir:
    base = {"method": "supervised", "arch": "resnet8", "dataset": "embedded", "device": "cpu", "epochs": 3}
    return create_run_dir(root, name, RECIPE, {**base, **info})


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_document_fields_and_params(tmp_path: Path) -> None:
    run = make_run(tmp_path, status="finished", best={"val.top1": 0.5, "epoch": 2, "metric": "val.top1"})
    doc = doc_from_run(run)
    assert doc.keys() >= DOC_FIELDS
    assert doc["id"] == run.id and doc["status"] == "finished" and doc["best"]["val.top1"] == 0.5
    assert doc["params"]["optim.lr"] == 0.1 and doc["params"]["train.epochs"] == 3  # dotted keys of recipe.toml
    assert doc["run_dir"] == str(run.path.resolve())
    json.dumps(doc)  # plain JSON


def _finish_at_barrier(root: str, run_id: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    run = RunDir(Path(root) / run_id)
    barrier.wait()
    run.update_info(status="finished", ended=time.time(), best={"val.top1": 0.9})
    RunStore(Path(root)).upsert(doc_from_run(run))  # what each run's supervisor does when its run ends


def _read_until(root: str, stop: multiprocessing.synchronize.Event, errors: multiprocessing.Queue) -> None:
    store = RunStore(Path(root))
    while not stop.is_set():
        try:
            store.all()
        except StoreError as err:  # a torn file would show here
            errors.put(str(err))


def test_eight_runs_finishing_at_once_lose_no_update(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    runs = [make_run(tmp_path, f"r{i}", status="running") for i in range(8)]
    for run in runs:
        store.upsert(doc_from_run(run))
    ctx = multiprocessing.get_context("fork")
    barrier, stop, errors = ctx.Barrier(8), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_read_until, args=(str(tmp_path), stop, errors))
    reader.start()
    writers = [ctx.Process(target=_finish_at_barrier, args=(str(tmp_path), run.id, barrier)) for run in runs]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    stop.set()
    reader.join(30)
    assert errors.empty()
    docs = store.all()
    assert len(docs) == 8 and {d["status"] for d in docs} == {"finished"}
    assert all(d["best"] == {"val.top1": 0.9} for d in docs)


def test_sync_reconciles_with_run_dirs(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    host = socket.gethostname()
    crashed = make_run(tmp_path, "crashed", status="running", pid=dead_pid(), host=host)
    alive = make_run(tmp_path, "alive", status="running", pid=os.getpid(), host=host)
    make_run(tmp_path, "orphan", status="queued", queue_pid=dead_pid(), host=host)
    make_run(tmp_path, "waiting", status="queued", queue_pid=os.getpid(), host=host)
    gone = make_run(tmp_path, "gone", status="finished")
    store.upsert(doc_from_run(gone))
    store.upsert({**doc_from_run(crashed), "status": "running"})
    shutil.rmtree(gone.path)
    docs = {d["name"]: d for d in store.sync()}
    assert set(docs) == {"crashed", "alive", "orphan", "waiting"}  # dirs added, vanished dir dropped
    assert docs["crashed"]["status"] == "interrupted" and docs["alive"]["status"] == "running"
    assert docs["orphan"]["status"] == "interrupted" and docs["waiting"]["status"] == "queued"
    assert {d["name"] for d in store.all()} == set(docs)
    before = store.path.stat().st_mtime_ns
    store.sync()  # nothing changed: no write
    assert store.path.stat().st_mtime_ns == before
    alive.update_info(status="finished", epoch=3)  # progress seen on the next sync
    assert next(d for d in store.sync() if d["name"] == "alive")["status"] == "finished"


def test_rebuild_reproduces_the_store(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    a = make_run(tmp_path, "a", status="finished", best={"val.top1": 0.7, "epoch": 3, "metric": "val.top1"})
    b = make_run(tmp_path, "b", status="failed", error="loss became nan")
    make_run(tmp_path, "c", status="interrupted", epoch=1)
    write_annotations(a, tags=["baseline"], note="first try")
    write_annotations(b, tags=["bad-lr"])
    store.sync()
    before = store.all()
    store.path.write_text('{"runs": {"1": ')  # torn / corrupted
    with pytest.raises(StoreError, match="kdtui runs --rebuild"):
        store.all()
    assert store.rebuild() == 3
    assert store.all() == before
    assert next(d for d in before if d["name"] == "a")["tags"] == ["baseline"]


def test_query_filters_and_sorts(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for name, status, top1 in (("x", "finished", 0.5), ("y", "finished", 0.8), ("z", "failed", None)):
        run = make_run(tmp_path, name, status=status, best={"val.top1": top1} if top1 is not None else {})
        store.upsert(doc_from_run(run))
    store.update(store.query(text="y")[0]["id"], tags=["keep"])
    assert [d["name"] for d in store.query(status="finished", sort="val.top1")] == ["y", "x"]
    assert [d["name"] for d in store.query(sort="val.top1", descending=False)] == ["x", "y", "z"]  # missing last
    assert [d["name"] for d in store.query(tag="keep")] == ["y"]
    assert store.query(method="distill") == []
    run_id = store.query(text="z")[0]["id"]
    store.remove(run_id)
    assert store.get(run_id) is None and len(store.all()) == 2
