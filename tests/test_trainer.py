"""The training loop: metric events, TensorBoard, atomic checkpoints, exact resume, NaN, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.rundir import RunDir, iter_run_dirs
from engine.trainer import EXIT_FAILED, EXIT_FINISHED, Trainer, train
from tests.conftest import ROOT
from tui.launcher import create_runs, engine_env, prepare


def new_run(recipe: Path, runs_dir: Path, overrides: list[str] | None = None) -> RunDir:
    return create_runs(prepare(recipe, overrides, runs_dir), runs_dir)[0]


def weights(run: RunDir, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run.checkpoints / name)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_writes_the_contract(tiny_recipe: Path, runs_dir: Path) -> None:
    run = new_run(tiny_recipe, runs_dir)
    assert train(run.path) == EXIT_FINISHED
    info = run.read_info()
    assert info["status"] == "finished" and info["epoch"] == 3 and info["pid"] == os.getpid()
    assert info["best"]["metric"] == "val.top1" and 0 <= info["best"]["val.top1"] <= 1
    assert {"started", "ended", "host", "steps_per_epoch"} <= info.keys()
    events = run.events()
    steps = [e for e in events if e["split"] == "train" and e.get("kind") == "step"]
    required = {"time", "epoch", "step", "loss", "top1", "top5", "lr", "images_per_s"}
    assert steps and all(required <= e.keys() for e in steps)
    for split in ("val", "test"):
        evals = [e for e in events if e["split"] == split]
        assert [e["epoch"] for e in evals] == [1, 2, 3]
        assert all(0 <= e["top1"] <= e["top5"] <= 1 and e["loss"] > 0 for e in evals)
    # lr dropped x0.1 at the milestone (epoch 2 starts at index 2)
    lrs = {e["epoch"]: e["lr"] for e in steps}
    assert lrs[3] == pytest.approx(lrs[1] * 0.1)
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    state = load_checkpoint(run.checkpoints / "last.pt")
    assert state["arch"] == "resnet8" and state["num_classes"] == 10 and "[optim]" in state["recipe"]
    assert (run.path / "recipe.toml").read_text().count("[train]") == 1


def test_tensorboard_mirrors_metrics(tiny_recipe: Path, runs_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = new_run(tiny_recipe, runs_dir, ["train.epochs=1"])
    train(run.path)
    acc = EventAccumulator(str(run.tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/top1", "train/lr", "val/loss", "val/top1", "test/top1"} <= tags
    jsonl = [e["top1"] for e in run.events() if e["split"] == "val"]
    assert [round(s.value, 5) for s in acc.Scalars("val/top1")] == [round(v, 5) for v in jsonl]
    assert acc.Tags()["graph"]


def test_resume_after_kill_is_bit_identical(tiny_recipe: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = new_run(tiny_recipe, runs_dir)
    train(reference.path)

    interrupted = new_run(tiny_recipe, runs_dir)
    original = Trainer._end_of_epoch_checkpoints

    def die_after_epoch_one(self: Trainer, evals: dict) -> None:
        original(self, evals)
        if self.progress.epoch == 1:
            raise SystemExit("simulated SIGKILL")

    monkeypatch.setattr(Trainer, "_end_of_epoch_checkpoints", die_after_epoch_one)
    with pytest.raises(SystemExit):
        train(interrupted.path)
    monkeypatch.undo()
    assert train(interrupted.path, resume=True) == EXIT_FINISHED
    assert_same_weights(weights(reference), weights(interrupted))
    # metric curves continue without duplicated steps
    steps = [e["step"] for e in interrupted.events() if e["split"] == "val"]
    assert steps == sorted(set(steps)) and len(steps) == 3


def test_stop_mid_epoch_then_resume_is_bit_identical(tiny_recipe: Path, runs_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reference = new_run(tiny_recipe, runs_dir)
    train(reference.path)
    stopped = new_run(tiny_recipe, runs_dir)
    original = Trainer._step

    def request_stop_at_step_7(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step == 6:  # the 7th step: epoch 2, second batch
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", request_stop_at_step_7)
    assert train(stopped.path) == 130
    monkeypatch.undo()
    info = stopped.read_info()
    assert info["status"] == "interrupted" and info["step"] == 7
    assert load_checkpoint(stopped.checkpoints / "last.pt")["progress"]["batch_in_epoch"] == 2
    assert train(stopped.path, resume=True) == EXIT_FINISHED
    assert_same_weights(weights(reference), weights(stopped))


def test_nan_loss_fails_naming_epoch_and_step(tiny_recipe: Path, runs_dir: Path) -> None:
    run = new_run(tiny_recipe, runs_dir, ["optim.lr=1e8", "train.log_every=1"])
    assert train(run.path) == EXIT_FAILED
    info = run.read_info()
    assert info["status"] == "failed"
    assert "epoch 1, step" in info["error"] and "loss became" in info["error"]
    assert not (run.checkpoints / "last.pt").exists()


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def broken_save(obj: object, handle) -> None:
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_sigterm_checkpoints_and_resume_finishes(tiny_recipe: Path, runs_dir: Path) -> None:
    run = new_run(tiny_recipe, runs_dir, ["train.epochs=30"])
    process = subprocess.Popen([sys.executable, "-m", "engine", str(run.path)], env=engine_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not [e for e in run.events() if e.get("kind") == "step"] and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    info = run.read_info()
    assert info["status"] == "interrupted" and info["ended"]
    assert load_checkpoint(run.checkpoints / "last.pt")["progress"]["step"] == info["step"]
    resumed = subprocess.run([sys.executable, "-m", "engine", str(run.path), "--resume"], env=engine_env(),
                             capture_output=True, timeout=300, cwd=ROOT, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert run.read_info()["status"] == "finished" and run.read_info()["epoch"] == 30


def test_kdtui_run_cli_end_to_end(tiny_recipe: Path, runs_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tui", "run", str(tiny_recipe), "--set", "train.epochs=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-2].split(": ", 1)[1]) if "best" in result.stdout else None
    runs = [run.path for run in iter_run_dirs(runs_dir)]
    assert len(runs) == 1 and json.loads((runs[0] / "run.json").read_text())["status"] == "finished"
    assert run_dir is None or run_dir == runs[0].resolve()
    log = (runs[0] / "train.log").read_text()
    assert "epoch 1/1" in log


def test_bad_recipe_creates_no_run_dir(tmp_path: Path, runs_dir: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 'x'\n")
    result = subprocess.run([sys.executable, "-m", "tui", "run", str(bad)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "optim.lr" in result.stderr and "Traceback" not in result.stderr
    made = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if runs_dir.exists() else []
    assert made == []
