"""Shared fixtures: a private runs root and a tiny, fast recipe on the embedded data."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# One thread per test process: `pytest -n 2` on 2 cores is fastest this way, and the
# engine subprocesses the tests start inherit it (a 2-thread resnet forward was 20x slower here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_RECIPE = """
[run]
name = "tiny"
method = "supervised"

[data]
dataset = "embedded"
batch_size = 32
eval_batch_size = 256
val_fraction = 0.2
embedded_per_class = 16

[model]
arch = "resnet8"

[optim]
lr = 0.05

[schedule]
name = "multistep"
milestones = [2]

[train]
epochs = 3
seed = 1
threads = 1
log_every = 2

[checkpoint]
every = 1
"""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the heavier reliability variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="heavy variant: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "runs"
    monkeypatch.setenv("KDTUI_RUNS_DIR", str(path))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


def write_recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def run_two_gloo_ranks(worker: Any, *args: Any) -> list[Any]:
    """Run worker(rank, port, *args, queue) in two forked processes (forking skips re-importing torch)
    and return what each put on the queue, sorted; worker sets up gloo on 127.0.0.1:port itself."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    return results


def kdtui_cli(*args: str, runs: Path) -> Any:
    """`python -m tui ARGS` in a subprocess on the runs root `runs`: the command line a user types."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "tui", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "KDTUI_RUNS_DIR": str(runs)})
