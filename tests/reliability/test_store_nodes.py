"""A runs root shared by many machines: 8 "nodes" finishing at once, and locks left by dead holders.

Each node is a process with its own lock identity (tests/reliability/node_worker.py), so the
store lock (tui/netlock.py) cannot use the shortcut of checking a local pid: only what holds
between NFS clients (link(2), the heartbeat, stale-by-age) keeps them apart. The 8 nodes start
their array tasks, report progress and finish at the same moment while the real `kdtui runs`
syncs from "the login node"; no update may be lost, the index must stay one valid JSON file
without duplicate documents, and every run must end `finished`.
"""

from __future__ import annotations

import errno
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.rundir import iter_run_dirs
from tests.conftest import ROOT
from tests.test_launcher import invoke
from tui import netlock
from tui import store as store_module
from tui.store import STORE_FILE, RunStore, StoreError

NODES, UPDATES = 8, 25
WORKER = Path(__file__).with_name("node_worker.py")
RECIPE = """
[run]
name = "node"
method = "supervised"
[data]
dataset = "embedded"
embedded_per_class = 4
image_size = 16
[model]
arch = "resnet8"
[train]
epochs = 1
max_steps_per_epoch = 1
[sweep]
"train.seed" = [1, 2, 3, 4, 5, 6, 7, 8]
"""


def cli_runs(root: Path) -> list[dict]:
    listed = subprocess.run([sys.executable, "-m", "tui", "runs", "--json", "--runs-dir", str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def leftovers(root: Path) -> list[str]:
    """Lock, claim and break files still on disk (a clean release leaves none)."""
    names = [p for p in root.rglob("*") if p.name.endswith((".lock", ".claim", ".break")) or ".lock." in p.name]
    return sorted(str(p.relative_to(root)) for p in names)


def test_eight_nodes_finishing_at_once_lose_no_update(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    recipe = tmp_path / "nodes.toml"
    recipe.write_text(RECIPE)
    code, out, err = invoke("slurm", str(recipe), "--set", "train.device=cpu", "--runs-dir", str(root))
    assert code == 0, err
    sweep_dir = Path(out.strip().splitlines()[-1]).parent
    runs = sorted(iter_run_dirs(root), key=lambda r: r.read_info()["slurm_array_index"])
    assert len(runs) == NODES
    go = tmp_path / "go"
    nodes = [subprocess.Popen([sys.executable, str(WORKER), "finish", str(run.path), str(sweep_dir), str(i),
                               str(UPDATES), str(go)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i, run in enumerate(runs)]
    time.sleep(1.0)  # let them import and wait at the start line
    began = time.perf_counter()
    go.touch()
    listings = []
    while any(n.poll() is None for n in nodes):  # the login node lists (and syncs, under the lock) meanwhile
        listings.append(cli_runs(root))
    outputs = [n.communicate(timeout=120) for n in nodes]
    wall = time.perf_counter() - began

    for (_, stderr), node in zip(outputs, nodes, strict=True):
        assert node.returncode == 0, stderr
    table = json.loads((root / STORE_FILE).read_text())["runs"]  # the raw index, before any further sync
    ids = [doc["id"] for doc in table.values()]
    assert len(ids) == len(set(ids)) == NODES  # no duplicate documents
    for run in runs:
        doc = next(d for d in table.values() if d["id"] == run.id)
        assert doc["status"] == "finished" and doc["step"] == UPDATES, doc  # each node's last update is there
        assert doc["slurm_job"] == f"777_{run.read_info()['slurm_array_index']}"
    assert all(len(listing) == NODES for listing in listings)
    assert [d["status"] for d in cli_runs(root)] == ["finished"] * NODES
    assert leftovers(root) == []
    waits = sorted(w for stdout, _ in outputs for w in json.loads(stdout.strip().splitlines()[-1])["waits_ms"])
    p95 = waits[int(0.95 * (len(waits) - 1))]
    print(f"\nstore on a shared root: {NODES} nodes x {UPDATES + 1} writes in {wall:.2f} s with {len(listings)} CLI "
          f"syncs; write latency p50 {statistics.median(waits):.1f} ms, p95 {p95:.1f} ms, max {waits[-1]:.1f} ms; "
          f"0 lost, 0 duplicates")


def hold(path: Path, seconds: float, identity: str, *timing: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, str(WORKER), "hold", str(path), str(seconds), identity,
                               *map(str, timing)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_dead_holders_lock_is_recovered(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    lock = Path(store.lock.lock_file)
    # a process of this machine that died holding the lock: broken at once (its pid is gone)
    holder = hold(lock, 600, netlock.IDENTITY)
    holder.kill()
    holder.wait()
    began = time.perf_counter()
    store.upsert({"id": "a", "run_dir": str(tmp_path), "status": "finished"})
    assert time.perf_counter() - began < 5 and not lock.exists()
    # a lock of another machine: held while its heartbeat is fresh, broken once it is STALE_S old
    lock.write_text(json.dumps({"host": "elsewhere", "identity": "elsewhere:x", "pid": 1, "token": "t"}))
    store.lock.timeout = 0.5
    with pytest.raises(StoreError, match="locked by pid 1 on elsewhere"):
        store.upsert({"id": "b", "run_dir": str(tmp_path), "status": "finished"})
    old = time.time() - netlock.STALE_S - 5
    os.utime(lock, (old, old))
    store.upsert({"id": "b", "run_dir": str(tmp_path), "status": "finished"})
    assert [d["id"] for d in store.all()] == ["a", "b"] and not lock.exists()
    # an unreadable lock file (an older kdtui's empty flock file): stale by age alone
    lock.write_text("")
    os.utime(lock, (old, old))
    store.upsert({"id": "c", "run_dir": str(tmp_path), "status": "finished"})
    assert len(store.all()) == 3


def test_a_slow_holder_keeps_its_lock_by_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlock, "STALE_S", 0.5)
    lock = netlock.NetLock(tmp_path / "x.lock", timeout=30)
    holder = hold(lock.path, 2.0, "node-a", 0.5, 0.1)  # holds 4x the stale limit, refreshing every 0.1 s
    with lock:
        got = time.time()
    assert holder.stdout is not None
    released = float(holder.stdout.readline().split()[1])
    assert holder.wait(30) == 0
    assert got >= released  # waited for the release: never broke a live lock


def test_a_holder_that_lost_its_lock_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore(tmp_path)
    store.upsert({"id": "a", "run_dir": str(tmp_path), "status": "finished"})
    before = store.path.read_bytes()
    original = store_module.AtomicJSONStorage.read

    def read_then_lose_lock(self: store_module.AtomicJSONStorage) -> object:
        data = original(self)
        # meanwhile this process froze past STALE_S, another node broke the lock and took it
        Path(store.lock.lock_file).write_text(json.dumps({"identity": "node-b", "pid": 1, "token": "theirs"}))
        return data

    monkeypatch.setattr(store_module.AtomicJSONStorage, "read", read_then_lose_lock)
    with pytest.raises(StoreError, match="no longer holds the lock"):
        store.upsert({"id": "b", "run_dir": str(tmp_path), "status": "finished"})
    assert store.path.read_bytes() == before
    assert json.loads(Path(store.lock.lock_file).read_text())["token"] == "theirs"  # their lock left alone


@pytest.mark.parametrize("hard_links", [True, False])
def test_lock_excludes_other_threads_and_is_reentrant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      hard_links: bool) -> None:
    if not hard_links:  # e.g. a FUSE or SMB mount: link(2) fails with EPERM, O_EXCL create is used instead
        def no_link(src: object, dst: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(netlock.os, "link", no_link)
    lock = netlock.NetLock(tmp_path / "x.lock", timeout=0.3)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with lock:
                pass
        except netlock.LockTimeout as err:
            errors.append(err)

    with lock, lock:  # reentrant in one thread
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        lock.verify()
    assert len(errors) == 1 and "locked by pid" in str(errors[0])
    assert not lock.path.exists() and leftovers(tmp_path) == []
    other_thread()
    assert len(errors) == 1  # free again
