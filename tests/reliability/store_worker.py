"""One writer of the store concurrency test: `python store_worker.py ROOT WORKER UPDATES GO_FILE`.

Waits for GO_FILE (so all writers start together), then makes UPDATES writes through RunStore,
cycling over: insert a new document, update that document, update the one document every
writer shares (a read-modify-write of one field). After each write it parses kdtui.json.
Prints {"torn": n} (writes after which the file was not valid JSON).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tui.store import RunStore

SHARED = "shared"


def planned(worker: int, updates: int) -> tuple[dict[str, int], int]:
    """What this writer leaves behind: {own doc id: count} and its last value in the shared doc."""
    own = {f"w{worker}-{i:03d}": (i + 1 if i + 1 < updates else 0) for i in range(0, updates, 3)}
    return own, max(i for i in range(updates) if i % 3 == 2)


def main(root: Path, worker: int, updates: int, go: Path) -> None:
    store = RunStore(root)
    while not go.exists():
        time.sleep(0.001)
    torn = 0
    for i in range(updates):
        if i % 3 == 0:
            store.upsert({"id": f"w{worker}-{i:03d}", "run_dir": str(root), "status": "finished", "count": 0})
        elif i % 3 == 1:
            store.update(f"w{worker}-{i - 1:03d}", count=i)
        else:
            store.update(SHARED, **{f"w{worker}": i})
        try:
            json.loads(store.path.read_bytes())
        except ValueError:
            torn += 1
    print(json.dumps({"torn": torn}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
