"""Kill at any moment: SIGKILL a real engine process at 20 seeded moments, then resume to the end.

One run is killed 20 times in a row: each kill lands in a fresh engine process that resumed
from whatever the previous kill left (`--resume` from last.pt, or a fresh start when there is
none, as `kdtui resume` does). After every kill the run directory must be usable: every
checkpoint loads, run.json and metrics.jsonl parse, and the run reads as `interrupted`. At the
end the real `kdtui resume` finishes the run, and its weights, optimizer state and per-step
losses must be bit-identical to a run that was never interrupted.

Moments are drawn from a seeded RNG over three phases: inside a training step (after step s was
logged), inside evaluation (after the val metrics were logged, while the test split is being
evaluated) and inside a checkpoint write (the test-only KDTUI_FAULT_DELAY_CHECKPOINT_S pause
holds the temp file half-written). Where each kill really landed is read back from the files.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.checkpoint import FAULT_DELAY_ENV, load_checkpoint
from engine.errors import CheckpointError
from engine.rundir import RunDir, effective_status, read_jsonl
from tests.reliability.procs import (
    EventWatch,
    ForkServer,
    FreshEngine,
    kill,
    new_run,
    run_cli,
    temp_checkpoints,
    wait_until,
)

EPOCHS, STEPS = 5, 4  # 60 train images, batch 16
KILL_RECIPE = f"""
[run]
name = "killme"
method = "supervised"

[data]
dataset = "embedded"
batch_size = 16
eval_batch_size = 256
val_fraction = 0.2
embedded_per_class = 8

[model]
arch = "resnet8"

[optim]
lr = 0.05

[schedule]
name = "multistep"
milestones = [3]

[train]
epochs = {EPOCHS}
seed = 3
threads = 1
log_every = 1

[checkpoint]
every = 1
keep = 3
"""
PHASES = ("step", "eval", "checkpoint")
CHECKPOINT_PAUSE_S = "1.5"
TORN_LINE = b'{"time": 1.0, "epoch": 9, "step": 99, "spl'  # what a write cut short would leave


@dataclass(frozen=True)
class Moment:
    phase: str
    epoch: int  # 1-based
    step: int = 0  # "step": kill once this global step was logged (the process is in the next one)

    def key(self) -> tuple[int, int, int]:
        return self.epoch, PHASES.index(self.phase), self.step

    def reached(self, events: list[dict[str, Any]], temps: list[Path]) -> bool:
        """The process is at this moment, or already past it (then kill at once)."""
        if any(e.get("epoch", 0) > self.epoch for e in events):
            return True
        if self.phase == "step":
            return any(e.get("kind") == "step" and e["step"] >= self.step for e in events)
        if self.phase == "eval":
            return any(e["split"] in ("val", "test") and e["epoch"] == self.epoch for e in events)
        return bool(temps) and any(e["split"] == "test" and e["epoch"] == self.epoch for e in events)


def plan(seed: int, count: int = 20) -> list[Moment]:
    """`count` moments in run order: a phase, then a place in it, both from a seeded RNG."""
    rng = random.Random(seed)
    moments = []
    for _ in range(count):
        phase, epoch = rng.choice(PHASES), rng.randint(1, EPOCHS)
        step = (epoch - 1) * STEPS + rng.randint(1, STEPS - 1) if phase == "step" else 0
        moments.append(Moment(phase, epoch, step))
    return sorted(moments, key=Moment.key)


def temps_since(run: RunDir, since: float) -> list[Path]:
    """Temp checkpoints this process created (older ones are a previous kill's, removed on start)."""
    found = []
    for path in temp_checkpoints(run):
        try:
            if path.stat().st_mtime >= since:
                found.append(path)
        except FileNotFoundError:  # renamed into place (or removed) since the listing
            continue
    return found


def landed(events: list[dict[str, Any]], temps: list[Path]) -> str:
    """Where a kill really hit, from what the process left behind."""
    if temps:
        return "checkpoint"  # a temp file this process was still writing
    if not events:
        return "startup"
    last = events[-1]
    if last["split"] == "val" or last.get("kind") == "epoch":
        return "eval"  # evaluating (test split after val was logged, or val after the epoch summary)
    if last["split"] == "test":
        return "after-eval"
    return "step"


def check_after_kill(run: RunDir, events: list[dict[str, Any]], where: str, temps: list[Path]) -> dict[str, int]:
    """Everything a user (or `kdtui resume`) reads from the run directory is intact."""
    loaded = 0
    for path in sorted(run.checkpoints.glob("*.pt")):
        load_checkpoint(path)  # raises on a torn file
        loaded += 1
    if where == "checkpoint":
        for temp in temps:  # the kill really cut a write short ...
            with pytest.raises(CheckpointError):
                load_checkpoint(temp)
        writing = max(e["epoch"] for e in events if e["split"] == "test")  # the epoch whose checkpoint was cut
        last = run.checkpoints / "last.pt"  # ... and last.pt is still the previous epoch's
        assert (load_checkpoint(last)["progress"]["epoch"] if last.exists() else 0) == writing - 1
    info = json.loads(run.info_path.read_text())
    assert info["status"] == "running" and effective_status(info) == "interrupted", info
    raw = run.metrics_path.read_bytes()
    *complete, tail = raw.split(b"\n")
    for line in complete:
        json.loads(line)  # every complete line is valid JSON
    return {"checkpoints": loaded, "torn": int(bool(tail))}


def assert_same_state(a: dict[str, Any], b: dict[str, Any], path: str = "") -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def kill_chain(tmp_path: Path, runs_dir: Path, seed: int, fresh: set[int],
               caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    recipe = tmp_path / "kill.toml"
    recipe.write_text(KILL_RECIPE)
    moments, rng = plan(seed), random.Random(seed + 1)
    server = ForkServer() if len(fresh) < len(moments) else None
    reference, run = new_run(recipe, runs_dir), new_run(recipe, runs_dir)  # reference: never interrupted
    hits: Counter[str] = Counter()
    cli_checked: set[str] = set()
    try:
        assert (server.spawn(reference, False) if server else FreshEngine(reference, False)).wait() == 0
        for i, moment in enumerate(moments):
            resume = (run.checkpoints / "last.pt").exists()
            if not resume:  # as `kdtui resume` does for a run without a checkpoint: start over
                run.metrics_path.unlink(missing_ok=True)
                shutil.rmtree(run.tb_dir, ignore_errors=True)
            env = {FAULT_DELAY_ENV: CHECKPOINT_PAUSE_S} if moment.phase == "checkpoint" else {}
            since = time.time()
            engine = FreshEngine(run, resume, env) if i in fresh or server is None else server.spawn(run, resume, env)
            watch = EventWatch(run, since)

            def at_moment(moment: Moment = moment, watch: EventWatch = watch, since: float = since) -> bool:
                return moment.reached(watch.poll(), temps_since(run, since))

            wait_until(at_moment, engine)
            if moment.phase == "step":
                time.sleep(rng.uniform(0, 0.01))  # somewhere inside the next step
            assert kill(engine) == -9, f"kill {i} ({moment}) did not hit a live engine"
            temps, events = temps_since(run, since), watch.poll()
            where = landed(events, temps)
            hits[where] += 1
            state = check_after_kill(run, events, where, temps)
            assert state["torn"] == 0  # the engine writes each metric line in one write()
            if where not in cli_checked:  # the real CLI agrees, once per phase
                listed = run_cli("runs", "--json", "--runs-dir", str(runs_dir))
                assert listed.returncode == 0, listed.stderr
                assert {d["id"]: d["status"] for d in json.loads(listed.stdout)}[run.id] == "interrupted"
                cli_checked.add(where)
            if i % 4 == 3:  # a torn last line (as a write cut short leaves) is skipped with a warning
                before = run.events()
                with run.metrics_path.open("ab") as handle:
                    handle.write(TORN_LINE)
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="engine.rundir"):
                    assert read_jsonl(run.metrics_path) == before
                assert "not valid JSON" in caplog.text
                hits["torn line added"] += 1
    finally:
        if server is not None:
            server.close()

    resumed = run_cli("resume", run.id, "--runs-dir", str(runs_dir))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert run.read_info()["status"] == "finished" and run.read_info()["epoch"] == EPOCHS
    ours, theirs = load_checkpoint(run.checkpoints / "last.pt"), load_checkpoint(reference.checkpoints / "last.pt")
    for part in ("model", "modules", "optimizer", "scheduler", "progress"):
        assert_same_state(ours[part], theirs[part], part)
    steps = lambda r: [(e["step"], e["loss"]) for e in r.events() if e.get("kind") == "step"]
    assert steps(run) == steps(reference)  # every step logged once, with the same loss
    assert [p.name for p in temp_checkpoints(run)] == []  # no partial temp file left behind
    for path in run.checkpoints.glob("*.pt"):
        load_checkpoint(path)
    assert run.metrics_path.read_bytes().endswith(b"\n")  # the torn lines were dropped on resume
    planned = Counter(m.phase for m in moments)
    print(f"\nkill test seed {seed}: planned {dict(planned)}; landed {dict(hits)}")
    for phase in PHASES:  # the kills really spread over the three phases
        assert hits[phase] >= 1, hits
    return {"planned": planned, "landed": hits}


def test_sigkill_at_20_moments_then_resume_is_bit_identical(tmp_path: Path, runs_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Default variant: kill 1 is a fresh `python -m engine`, kills 2-20 are preloaded forks."""
    kill_chain(tmp_path, runs_dir, seed=0, fresh={0}, caplog=caplog)


@pytest.mark.slow
def test_sigkill_at_20_moments_fresh_processes(tmp_path: Path, runs_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Heavy variant: other moments, and every killed engine is a fresh `python -m engine`."""
    kill_chain(tmp_path, runs_dir, seed=1, fresh=set(range(20)), caplog=caplog)
