"""Fixed, fake run folders for the TUI tests and snapshots: same bytes every time, no torch.

Timestamps are fixed (2026-01-05 UTC), curves are closed-form, and the one `running` run uses
the test process's own pid so it reads as alive without a training process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.conftest import TINY_RECIPE

T0 = 1_767_600_000.0  # 2026-01-05 08:00 UTC
STEPS_PER_EPOCH = 10
NOW = T0 + 2645  # the frozen clock: 'live' has been running 4m05s
SWEEP = TINY_RECIPE.replace('name = "tiny"', 'name = "sweep"') + '\n[sweep]\n"optim.lr" = [0.1, 0.2, 0.3]\n'


def events(epochs: int, lr: float, quality: float) -> list[dict[str, Any]]:
    """A plausible training history: loss falls, accuracies rise, a cosine learning rate."""
    out = []
    total = epochs * STEPS_PER_EPOCH
    for step in range(2, total + 1, 2):
        epoch = (step - 1) // STEPS_PER_EPOCH + 1
        progress = step / total
        out.append({"time": T0 + step, "epoch": epoch, "step": step, "split": "train", "kind": "step",
                    "loss": 2.3 * math.exp(-2.5 * progress * quality) + 0.05 * math.sin(step),
                    "top1": min(0.99, 0.1 + 0.8 * quality * progress), "top5": min(1.0, 0.5 + 0.5 * progress),
                    "lr": lr * 0.5 * (1 + math.cos(math.pi * progress)), "images_per_s": 1000.0})
        if step % STEPS_PER_EPOCH == 0:
            out.append({"time": T0 + step, "epoch": epoch, "step": step, "split": "val",
                        "loss": 2.2 * math.exp(-2 * progress * quality) + 0.1,
                        "top1": 0.1 + 0.7 * quality * progress, "top5": 0.5 + 0.45 * progress})
    return out


def write_run(root: Path, run_id: str, *, name: str, status: str, epoch: int, epochs: int = 6, lr: float = 0.05,
              quality: float = 1.0, method: str = "supervised", device: str = "cpu", tags: list[str] | None = None,
              offset_s: float = 0.0, truncated: bool = False) -> dict[str, Any]:
    """One run folder; `epoch` epochs of metrics are written, the last line torn when `truncated`."""
    path = root / run_id
    (path / "checkpoints").mkdir(parents=True)
    history = [e for e in events(epochs, lr, quality) if e["epoch"] <= epoch]
    best = max((e for e in history if e["split"] == "val"), key=lambda e: e["top1"], default=None)
    started = None if status == "queued" else T0 + offset_s
    info = {
        "id": run_id, "name": name, "status": status, "method": method, "arch": "resnet8", "dataset": "embedded",
        "device": device, "host": socket.gethostname(), "pid": os.getpid() if status == "running" else 4_000_000,
        "run_dir": str(path.resolve()), "recipe_path": "/recipes/tiny.toml", "created": T0 + offset_s - 5,
        "started": started, "ended": None if started is None or status == "running" else started + 60 * epoch + 7,
        "epoch": epoch, "epochs": epochs, "step": epoch * STEPS_PER_EPOCH, "steps_per_epoch": STEPS_PER_EPOCH,
        "best": {"val.top1": best["top1"], "val.loss": best["loss"], "epoch": best["epoch"], "metric": "val.top1"}
        if best else {},
        "last": {}, "tags": tags or [], "note": "",
        "error": "loss became nan at epoch 3" if status == "failed" else None,
        "sweep_point": {"optim.lr": lr},
    }
    (path / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (path / "recipe.toml").write_text(TINY_RECIPE.replace('name = "tiny"', f'name = "{name}"')
                                      .replace("lr = 0.05", f"lr = {lr}").replace('method = "supervised"',
                                                                                  f'method = "{method}"'))
    text = "".join(json.dumps(e) + "\n" for e in history)
    if truncated:
        text += '{"time": 1767600999.0, "epoch": 9, "step": 9'  # a write cut short
    (path / "metrics.jsonl").write_text(text)
    log = [f"kdtui: {method} resnet8 on embedded (130 train images), {epochs} epochs x {STEPS_PER_EPOCH} steps"]
    log += [f"epoch {e['epoch']}/{epochs} step {e['step']}  val.loss={e['loss']:.4f}  val.top1={e['top1']:.4f}"
            for e in history if e["split"] == "val"]
    (path / "train.log").write_text("\n".join(log) + "\n")
    return info


def fake_runs(root: Path) -> list[dict[str, Any]]:
    """Six runs covering every status, two methods, tags, and a torn metrics line."""
    root.mkdir(parents=True, exist_ok=True)
    return [
        write_run(root, "20260105-080000-baseline-a001", name="baseline", status="finished", epoch=6, tags=["ref"]),
        write_run(root, "20260105-081000-lr-0.1-a002", name="lr-0.1", status="finished", epoch=6, lr=0.1,
                  quality=1.2, offset_s=600),
        write_run(root, "20260105-082000-lr-0.2-a003", name="lr-0.2", status="failed", epoch=2, lr=0.2,
                  quality=0.4, offset_s=1200),
        write_run(root, "20260105-083000-kd-wrn-a004", name="kd-wrn", status="interrupted", epoch=3,
                  method="kd", device="cuda:0", offset_s=1800, tags=["kd"]),
        write_run(root, "20260105-084000-live-a005", name="live", status="running", epoch=4, quality=0.9,
                  offset_s=2400, truncated=True),
        write_run(root, "20260105-085000-queued-a006", name="queued", status="queued", epoch=0, offset_s=3000),
    ]


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body with asyncio (no pytest async plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


async def wait_for(pilot: Pilot, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Let the app run until `condition()` holds; fail with the condition's name after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {getattr(condition, '__name__', condition)}")
        await pilot.pause(0.05)


def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake runs in tmp/runs (synced into the store), recipes in tmp/recipes, cwd tmp, UTC, a frozen clock.
    Returns the runs root. Callers restore the time zone with `time.tzset()` after `monkeypatch.undo()`."""
    from tui.store import RunStore
    from tui.widgets import format as fmt

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(fmt, "now", lambda: NOW)
    root = tmp_path / "runs"
    fake_runs(root)
    RunStore(root).sync()
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.toml").write_text(TINY_RECIPE)
    (recipes / "sweep.toml").write_text(SWEEP)
    (recipes / "broken.toml").write_text(TINY_RECIPE.replace("lr = 0.05", "lr = -1"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDTUI_RUNS_DIR", str(root))
    return root
