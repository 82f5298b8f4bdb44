"""Concurrency: 8 processes each make 50 writes to runs/kdtui.json at once while readers list runs.

Checks that no update is lost (every document and every field each writer last set is there
at the end), that the file parses after every write (the writers check after each of theirs,
a reader thread re-reads it continuously), that no reader ever sees a torn or older file (the
set of ids only grows, each writer's field in the shared document never goes back), and that
`kdtui runs --json`, which syncs under the same lock, lists consistently meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.reliability.store_worker import SHARED, planned
from tui.store import RunStore

WORKERS, UPDATES = 8, 50
WORKER = Path(__file__).with_name("store_worker.py")


class Reader(threading.Thread):
    """Reads kdtui.json as fast as it can (raw bytes, and through RunStore) and checks every version."""

    def __init__(self, store: RunStore) -> None:
        super().__init__(daemon=True)
        self.store, self.stop = store, threading.Event()
        self.reads = self.torn = self.regressions = 0
        self.errors: list[str] = []

    def run(self) -> None:
        ids: set[str] = set()
        shared: dict[str, int] = {}
        while not self.stop.is_set():
            try:
                data = json.loads(self.store.path.read_bytes())
            except ValueError as err:
                self.torn += 1
                self.errors.append(str(err))
                continue
            docs = list(data["runs"].values())
            seen = {d["id"] for d in docs}
            values = next(d for d in docs if d["id"] == SHARED)
            if not ids <= seen or any(values.get(k, -1) < v for k, v in shared.items()):
                self.regressions += 1  # an older file, or a write that dropped another's update
            ids, shared = seen, {k: v for k, v in values.items() if k.startswith("w")}
            self.store.query(status="finished")  # the lock-free listing the TUI and `kdtui runs` use
            self.reads += 1


def test_eight_writers_fifty_updates_each_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    store = RunStore(root)
    store.upsert({"id": SHARED, "run_dir": str(root), "status": "finished"})
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, str(WORKER), str(root), str(w), str(UPDATES), str(go)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in range(WORKERS)]
    reader = Reader(store)
    reader.start()
    time.sleep(0.5)  # let the writers import and wait at the start line
    go.touch()
    listings: list[list[dict[str, Any]]] = []
    while any(w.poll() is None for w in writers):  # the real CLI lists (and syncs) meanwhile
        listed = subprocess.run([sys.executable, "-m", "tui", "runs", "--json", "--runs-dir", str(root)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        listings.append(json.loads(listed.stdout))
    outputs = [w.communicate(timeout=120) for w in writers]
    reader.stop.set()
    reader.join(timeout=30)

    for (out, err), w in zip(outputs, writers, strict=True):
        assert w.returncode == 0, err
        assert json.loads(out) == {"torn": 0}  # valid JSON after every one of its writes
    assert reader.torn == 0 and reader.regressions == 0, reader.errors[:3]
    assert reader.reads > 0 and listings
    docs = {d["id"]: d for d in store.all()}
    expected_shared = {}
    for w in range(WORKERS):
        own, last_shared = planned(w, UPDATES)
        for doc_id, count in own.items():
            assert docs[doc_id]["count"] == count, doc_id
        expected_shared[f"w{w}"] = last_shared
    assert {k: v for k, v in docs[SHARED].items() if k.startswith("w")} == expected_shared
    assert len(docs) == 1 + WORKERS * len(planned(0, UPDATES)[0])
    assert json.loads(store.path.read_bytes())  # and the final file is valid JSON
    sizes = [len(listing) for listing in listings]
    assert sizes == sorted(sizes)  # each CLI listing saw at least what the one before it saw
    print(f"\nstore concurrency: {WORKERS * UPDATES} writes, {reader.reads} reader passes, {len(listings)} CLI "
          f"listings, 0 torn, 0 lost")
