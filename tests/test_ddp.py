"""Multi-process training through torchrun on CPU (gloo): `cpu*2` and a two-"node" rendezvous.

Equivalence with one process: every rank takes its half of the same global batch, gradients are
summed over ranks after weighting each rank's mean loss by its share of the rows, and BatchNorm
statistics come from the global batch (train.sync_bn), with augmentation off so both runs see
identical pixels. What remains is floating-point summation order (two half-batch sums instead
of one). Measured on this recipe (lr 0.01, 2 epochs x 5 steps), DDP vs one process: step losses
differ by <= 2.4e-7 in epoch 1 and <= 3.1e-5 by step 10 (the amplification of SGD), eval losses
by <= 8.4e-6, weights by <= 9.5e-5. Two one-process runs differing only in thread count: 4.8e-7,
5.5e-5, 9.7e-6 and 6.5e-5 -- the same noise. Without sync_bn the first step already differs by
7.8e-3 and the weights by 0.14. Tolerances: epoch-1 step losses 1e-5, all step losses 5e-4,
eval losses 1e-4, accuracies within one image, weights 1e-3: >= 10x above the noise (3x for
step 10's loss) and below what a real error (no sync_bn, a wrong shard, an unaveraged
gradient) produces.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.rundir import iter_run_dirs
from engine.trainer import EXIT_FINISHED, train
from tests.test_launcher import invoke, wait_for
from tui.launcher import create_runs, prepare
from tui.store import RunStore

# NCHW on purpose: CPU channels-last (oneDNN) kernels round differently for a half batch than for the
# whole one (5e-5 on step losses here), which would blur what this test checks: the gradient arithmetic.
SAME = ["train.epochs=2", "train.channels_last=false", 'data.augment="none"', "train.sync_bn=true",
        "train.log_every=1", "optim.lr=0.01"]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["split"] == "train" and e.get("kind") == "step"]


def test_cpu2_ddp_matches_one_process_with_the_same_global_batch(tiny_recipe: Path, runs_dir: Path,
                                                                  tmp_path: Path) -> None:
    code, out, err = invoke("run", str(tiny_recipe), "--device", "cpu*2", *sets(SAME))
    assert code == 0, out + err
    (ddp,) = iter_run_dirs(runs_dir)
    info = ddp.read_info()
    assert info["status"] == "finished" and info["device"] == "cpu*2" and info["processes"] == 2
    assert not (ddp.path / ".dist").exists()  # rendezvous files cleaned up

    single_root = tmp_path / "single"
    single = create_runs(prepare(tiny_recipe, SAME, single_root), single_root)[0]
    assert train(single.path) == EXIT_FINISHED

    a, b = train_losses(ddp.events()), train_losses(single.events())
    assert len(a) == len(b) == info["epochs"] * info["steps_per_epoch"]  # one writer: no duplicated lines
    per_epoch = info["steps_per_epoch"]
    assert max(abs(x - y) for x, y in zip(a[:per_epoch], b[:per_epoch], strict=True)) < 1e-5
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 5e-4
    last_ddp, last_single = info["last"], single.read_info()["last"]
    for split in ("val", "test"):
        assert abs(last_ddp[f"{split}.loss"] - last_single[f"{split}.loss"]) < 1e-4
        n = 30 if split == "val" else 1000  # embedded: 20% of 160 held out; 100 test images per class
        assert abs(last_ddp[f"{split}.top1"] - last_single[f"{split}.top1"]) <= 1 / n + 1e-9
    wa = load_checkpoint(ddp.checkpoints / "last.pt")["model"]
    wb = load_checkpoint(single.checkpoints / "last.pt")["model"]
    assert wa.keys() == wb.keys()  # SyncBatchNorm layers save as plain BatchNorm
    assert max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point()) < 1e-3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_node_rendezvous_on_localhost(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `kdtui run --nnodes 2` commands (one per "machine", each its own runs dir) form one world of 2."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    endpoint = f"127.0.0.1:{free_port()}"
    roots = [tmp_path / "node0", tmp_path / "node1"]
    quick = sets(["train.epochs=1", "train.max_steps_per_epoch=3", "data.embedded_per_class=8"])
    for rank, root in enumerate(roots):
        code, out, err = invoke("run", str(tiny_recipe), "--runs-dir", str(root), "--device", "cpu", "--nnodes", "2",
                                "--node-rank", str(rank), "--rdzv-endpoint", endpoint, "--detach", *quick)
        assert code == 0, out + err
    runs = [next(iter_run_dirs(root)) for root in roots]
    wait_for(lambda: all(r.read_info().get("status") in ("finished", "failed", "interrupted") for r in runs), 300,
             "both nodes to finish")
    head, worker = (r.read_info() for r in runs)
    assert head["status"] == worker["status"] == "finished", (head.get("error"), worker.get("error"))
    assert head["processes"] == 2 and head["step"] == head["steps_per_epoch"] > 0  # one world of 2; rank 0 wrote it
    assert runs[0].events() and not runs[1].events()  # only global rank 0 writes metrics
    assert "metric" not in worker.get("best", {})
    time.sleep(0.5)
    assert RunStore(roots[1]).get(runs[1].id)["status"] == "finished"


@pytest.mark.slow
def test_ddp_stop_checkpoints_then_resume(tiny_recipe: Path, runs_dir: Path) -> None:
    """`kdtui stop` reaches one rank; all ranks agree to stop at the same step, checkpoint, resume."""
    code, _, err = invoke("run", str(tiny_recipe), "--device", "cpu*2", "--detach",
                          *sets(["train.epochs=20", "data.embedded_per_class=8"]))
    assert code == 0, err
    (run,) = iter_run_dirs(runs_dir)
    wait_for(lambda: (run.checkpoints / "last.pt").exists(), 300, "a checkpoint")
    code, out, err = invoke("stop", run.id)
    assert "SIGTERM" in out
    assert code == 0, err
    wait_for(lambda: run.read_info()["status"] == "interrupted", 120, "interrupted")
    state = load_checkpoint(run.checkpoints / "last.pt")
    assert state["progress"]["step"] == run.read_info()["step"] and len(state["rng"]["ranks"]) == 2
    code, _, err = invoke("resume", run.id, "--detach")
    assert code == 0, err
    wait_for(lambda: run.read_info()["status"] == "finished", 600, "finished")
    steps = [e["step"] for e in run.events() if e["split"] == "val"]
    assert steps == sorted(set(steps)) and len(steps) == 20
    assert json.loads((run.path / "run.json").read_text())["epoch"] == 20
    assert torch.isfinite(next(iter(state["model"].values())).float()).all()
