"""One "compute node" of the shared-runs-root tests: `python node_worker.py MODE ARGS`.

finish RUN_DIR SWEEP_DIR NODE UPDATES GO_FILE
    Acts as SLURM array task NODE on its own machine (its own lock identity, so no pid shortcut
    applies: only what holds across NFS clients). Waits for GO_FILE, runs the task's real start
    step, reports UPDATES progress steps (run.json + a store upsert each, as a busy node would),
    writes `finished` and runs the real end step. Prints {"waits_ms": [...]} (store write latencies).
hold LOCK_PATH SECONDS IDENTITY [STALE_S HEARTBEAT_S]
    Takes the NetLock, prints "held", keeps it SECONDS (heartbeating), releases, prints "released T".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.rundir import RunDir
from tui import netlock, slurm_array
from tui.store import RunStore, doc_from_run

ARRAY_JOB = "777"


def finish(run: RunDir, sweep_dir: Path, node: int, updates: int, go: Path) -> None:
    netlock.IDENTITY = f"node-{node}"  # another machine: its pids mean nothing to the others
    os.environ.update(SLURM_ARRAY_JOB_ID=ARRAY_JOB, SLURM_ARRAY_TASK_ID=str(node))
    store = RunStore(run.path.parent)
    while not go.exists():
        time.sleep(0.001)
    assert slurm_array.start(run, sweep_dir) == 0
    waits = []
    for step in range(1, updates + 1):
        run.update_info(status="running", pid=os.getpid(), step=step, started=time.time())
        began = time.perf_counter()
        store.upsert(doc_from_run(run))
        waits.append((time.perf_counter() - began) * 1000)
    run.update_info(status="finished", epoch=1, ended=time.time())
    began = time.perf_counter()
    assert slurm_array.end(run, 0) == 0
    waits.append((time.perf_counter() - began) * 1000)
    print(json.dumps({"waits_ms": waits}))


def hold(path: Path, seconds: float, identity: str, stale: float | None, heartbeat: float | None) -> None:
    netlock.IDENTITY = identity
    if stale is not None and heartbeat is not None:
        netlock.STALE_S, netlock.HEARTBEAT_S = stale, heartbeat
    lock = netlock.NetLock(path, timeout=30)
    with lock:
        print("held", flush=True)
        time.sleep(seconds)
    print(f"released {time.time()}", flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "finish":
        finish(RunDir(Path(args[0])), Path(args[1]), int(args[2]), int(args[3]), Path(args[4]))
    else:
        extra = [float(a) for a in args[3:5]] if len(args) >= 5 else [None, None]
        hold(Path(args[0]), float(args[1]), args[2], extra[0], extra[1])
