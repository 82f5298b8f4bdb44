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
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.checkpoint import load_checkpoint
from engine.methods import registry
from engine.methods.base import Method, Phase, StepOutput
from engine.rundir import RunDir, iter_run_dirs
from engine.trainer import EXIT_FAILED, EXIT_FINISHED, EXIT_INTERRUPTED, Trainer, train
from tests.conftest import ROOT, write_recipe
from tests.test_distill import fake_checkpoint
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


# ---------------------------------------------------------------- DistributedDataParallel itself


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_kd_with_a_deep_supervision_head_under_cpu2_matches_one_process(tiny_recipe: Path, runs_dir: Path,
                                                                       tmp_path: Path) -> None:
    """A method with a trainable module beside the student (kd's `aux_head`) and a frozen teacher
    that is no module of the method: DDP covers the head too, so both still match one process.
    Measured: step losses within 2.1e-7, weights within 2.4e-7; with the head left out of DDP
    (each rank stepping on its own half-batch gradient) the step losses part by 9.7e-4."""
    teacher = fake_checkpoint(tmp_path / "teacher.pt", "resnet8")
    recipe = write_recipe(tmp_path, tiny_recipe.read_text().replace('method = "supervised"', 'method = "kd"')
                          + f'\n[teacher]\ncheckpoint = "{teacher}"\n[distill]\naux_stage = 2\n', "kd.toml")
    quick = [*SAME, "train.epochs=1", "train.max_steps_per_epoch=4"]
    code, out, err = invoke("run", str(recipe), "--device", "cpu*2", *sets(quick))
    assert code == 0, out + err
    (ddp,) = iter_run_dirs(runs_dir)
    single_root = tmp_path / "single"
    single = create_runs(prepare(recipe, quick, single_root), single_root)[0]
    assert train(single.path) == EXIT_FINISHED
    a, b = train_losses(ddp.events()), train_losses(single.events())
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    sa, sb = (load_checkpoint(r.checkpoints / "last.pt")["modules"] for r in (ddp, single))
    assert sa.keys() == sb.keys() == {"model", "aux_head"}
    assert max_diff(sa["model"], sb["model"]) < 1e-5 and max_diff(sa["aux_head"], sb["aux_head"]) < 1e-5


class TwoPhase(Method):
    """A test method: a pre-phase trains only an extra head on detached features, then the model and
    head train together. `spare` is optimized but never used by the loss (absent under
    KDTUI_TEST_NO_SPARE); under KDTUI_TEST_CHANGE the loss drops the model's classifier from step 6."""

    def __init__(self, recipe: Any, data: Any, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        extra = {"head": nn.Linear(self.model.feature_dim, data.num_classes)}
        if not os.environ.get("KDTUI_TEST_NO_SPARE"):
            extra["spare"] = nn.Linear(2, 2)
        self.extra = nn.ModuleDict(extra).to(device)
        self.calls = 0

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"model": self.model, "extra": self.extra}

    def parameter_groups(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.extra.parameters()]

    def pre_phases(self) -> list[Phase]:
        return [Phase("init", 1, list(self.extra["head"].parameters()))]

    def train_mode(self) -> None:
        self.model.train()
        self.extra.train()

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        self.calls += 1
        feats = self.model.forward_features(self.augment(images, generator))
        logits = self.model.classifier(feats)
        loss = F.cross_entropy(self.extra["head"](feats.detach() if self.phase == "init" else feats), labels)
        if self.phase != "init" and not (os.environ.get("KDTUI_TEST_CHANGE") and self.calls > 5):
            loss = loss + F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits.detach(), "labels": labels}


TWO_PHASE = """
[run]
name = "two-phase"
method = "two_phase"
[data]
dataset = "embedded"
batch_size = 31
val_fraction = 0.2
embedded_per_class = 16
augment = "none"
[model]
arch = "resnet8"
[optim]
lr = 0.05
[train]
epochs = {epochs}
seed = 1
threads = 1
log_every = 1
max_steps_per_epoch = 3
sync_bn = true
channels_last = false
evaluate = false
[checkpoint]
every = 1
"""


def optimized(trainer: Trainer) -> list[nn.Parameter]:
    return [p for group in trainer.optimizer.param_groups for p in group["params"]]


def to_main_phase(trainer: Trainer) -> None:
    trainer.phase = trainer.phases[-1]
    trainer.method.phase = trainer.phase.name


def worker() -> None:
    """One rank of a two-process job started by `run_ranks` (env: RANK, WORLD_SIZE, KDTUI_DIST_STORE).
    argv: mode ("grads": one main-phase step of a 31-row global batch, gradients recorded as soon as
    backward returns; "fit": the whole run; "resume": from last.pt), the run directory, a file for
    what this rank saw. KDTUI_TEST_SIGNAL="RANK:STEP" sends SIGTERM to that rank during that step."""
    mode, run_path, out_path = sys.argv[1:4]
    registry.METHODS["two_phase"] = f"{__name__}:TwoPhase"
    trainer = Trainer(RunDir(Path(run_path)), resume=mode == "resume")
    signal_rank, _, signal_step = os.environ.get("KDTUI_TEST_SIGNAL", "-1:0").partition(":")
    seen: dict[str, Any] = {"phases": {}}
    after_backward = trainer.run_step.after_backward

    def record() -> None:
        grads = [None if p.grad is None else p.grad.clone() for p in optimized(trainer)]
        seen.setdefault("grads", grads)
        first = trainer.phase.name not in seen["phases"]
        if first:  # the phase's first step: its DDP as built, then what the probe decided
            ddp = trainer.run_step.ddp
            seen["phases"][trainer.phase.name] = {"ddp": type(ddp).__name__, **ddp._get_ddp_logging_data()}
        after_backward()
        if trainer.dist.rank == int(signal_rank) and trainer.progress.step + 1 == int(signal_step):
            os.kill(os.getpid(), signal.SIGTERM)  # reaches this rank only, in the middle of the step
        if first:
            seen["phases"][trainer.phase.name]["find_unused_after_first_step"] = trainer.run_step.find_unused

    trainer.run_step.after_backward = record
    if mode == "grads":
        to_main_phase(trainer)
        batch = next(trainer.data.train.batches(31, shuffle=False, drop_last=False))
        images, labels, indices, weight = trainer.dist.shard(*batch)
        seen["weight"] = weight
        trainer._step(images, labels, indices, torch.Generator().manual_seed(0), weight)
        trainer.dist.close()
        seen["code"] = 0
    else:
        seen["code"] = trainer.fit()
        seen["step"] = trainer.progress.step
    torch.save(seen, out_path)


def run_ranks(mode: str, run: RunDir, tmp_path: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Two ranks of a gloo job as plain subprocesses (a file store, no torchrun), each running worker()."""
    job = f"{mode}-{secrets.token_hex(4)}"  # a fresh file store per job
    base = {**os.environ, "WORLD_SIZE": "2", "KDTUI_DIST_STORE": str(tmp_path / f"store-{job}"),
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    outs = [tmp_path / f"{job}-rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", "from tests.test_ddp import worker; worker()", mode,
                               str(run.path), str(out)], cwd=ROOT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r, out in enumerate(outs)]
    logs = []
    try:
        logs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    return [torch.load(out, weights_only=False) for out in outs]


def two_phase_run(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, epochs: int = 1) -> RunDir:
    monkeypatch.setitem(registry.METHODS, "two_phase", f"{__name__}:TwoPhase")
    root = tmp_path / name
    recipe = write_recipe(tmp_path, TWO_PHASE.format(epochs=epochs), f"{name}.toml")
    return create_runs(prepare(recipe, None, root), root)[0]


def test_gradients_are_summed_by_ddp_when_backward_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As soon as backward returns (before any trainer code), each rank's gradients are DDP's sum
    of both shards (16 and 15 rows, loss weights 16/31 and 15/31): equal on both ranks and equal
    to the one-process gradient of the mean loss over all 31 rows."""
    ranks = run_ranks("grads", two_phase_run(tmp_path, "ddp", monkeypatch), tmp_path)
    single = Trainer(two_phase_run(tmp_path, "single", monkeypatch))
    assert single.run_step.ddp is None  # one process: no wrapper
    got: list[Tensor | None] = []
    single.run_step.after_backward = lambda: got.extend(
        None if p.grad is None else p.grad.clone() for p in optimized(single))
    to_main_phase(single)
    single._step(*next(single.data.train.batches(31, shuffle=False, drop_last=False)), torch.Generator().manual_seed(0))

    assert [seen["weight"] for seen in ranks] == [16 / 31, 15 / 31]
    n_params = len(got)
    for seen in ranks:
        info = seen["phases"]["train"]
        assert info["ddp"] == "DistributedDataParallel" and info["num_parameter_tensors"] == n_params
        assert info["find_unused_parameters"] and info["find_unused_after_first_step"]  # `spare` is never used
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    no_grad = [False] * (n_params - 2) + [True, True]  # spare.weight and spare.bias: no gradient anywhere
    assert [g is None for g in g0] == [g is None for g in g1] == [g is None for g in got] == no_grad
    for a, b, ref in zip(g0[:-2], g1[:-2], got[:-2], strict=True):
        assert torch.equal(a, b)
        assert float((a - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_each_phase_gets_its_own_ddp_and_the_run_matches_one_process(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-phase (the head only: the model's parameters are ignored) then the main phase (model,
    head and an unused `spare`): one DDP each; find_unused_parameters dropped where every parameter
    was used; the whole run matches one process, `spare` untouched on both."""
    runs = [two_phase_run(tmp_path, name, monkeypatch, epochs=2) for name in ("ddp", "single")]
    ranks = run_ranks("fit", runs[0], tmp_path)
    assert train(runs[1].path) == EXIT_FINISHED
    for seen in ranks:
        assert seen["code"] == EXIT_FINISHED
        init, main = seen["phases"]["init"], seen["phases"]["train"]
        assert init["num_parameter_tensors"] == 2 and not init["find_unused_after_first_step"]
        assert main["num_parameter_tensors"] > 2 and main["find_unused_after_first_step"]
    a, b = train_losses(runs[0].events()), train_losses(runs[1].events())
    assert len(a) == len(b) == 9 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    sa, sb = (load_checkpoint(r.checkpoints / "last.pt")["modules"] for r in runs)
    assert max_diff(sa["model"], sb["model"]) < 1e-3 and max_diff(sa["extra"], sb["extra"]) < 1e-3
    start = load_checkpoint(runs[0].checkpoints / "epoch_0001.pt")["modules"]["extra"]
    assert torch.equal(sa["extra"]["spare.weight"], start["spare.weight"])  # never stepped


def test_a_graph_that_changes_within_a_phase_is_a_clear_error(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every parameter was used in the main phase's first step, so its DDP runs without
    find_unused_parameters; when a later step leaves the classifier without a gradient, the run
    fails with a message that says why (rather than stepping with unreduced gradients)."""
    monkeypatch.setenv("KDTUI_TEST_NO_SPARE", "1")
    run = two_phase_run(tmp_path, "change", monkeypatch, epochs=2)
    ranks = run_ranks("fit", run, tmp_path, {"KDTUI_TEST_CHANGE": "1"})
    assert [seen["code"] for seen in ranks] == [EXIT_FAILED, EXIT_FAILED]
    assert not ranks[0]["phases"]["train"]["find_unused_after_first_step"]
    assert "graph must not change within a phase" in run.read_info()["error"]


def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM reaches rank 1 during step 4: the asynchronous flag read one step later stops both
    ranks after step 5 (mid-epoch). Resumed, rank 0 is signalled during step 6, the last of its
    epoch: the epoch-end agreement stops both there. The second resume finishes with weights
    bit-identical to an uninterrupted two-process run."""
    whole, parts = (two_phase_run(tmp_path, name, monkeypatch, epochs=2) for name in ("whole", "parts"))
    ranks = run_ranks("fit", whole, tmp_path)
    assert [seen["step"] for seen in ranks] == [9, 9]
    for mode, signalled, stopped in (("fit", "1:4", 5), ("resume", "0:6", 6)):
        ranks = run_ranks(mode, parts, tmp_path, {"KDTUI_TEST_SIGNAL": signalled})
        assert [(seen["code"], seen["step"]) for seen in ranks] == [(EXIT_INTERRUPTED, stopped)] * 2
        state = load_checkpoint(parts.checkpoints / "last.pt")
        assert state["progress"]["step"] == stopped and len(state["rng"]["ranks"]) == 2
    assert [seen["code"] for seen in run_ranks("resume", parts, tmp_path)] == [EXIT_FINISHED] * 2
    a, b = (load_checkpoint(r.checkpoints / "last.pt")["modules"] for r in (whole, parts))
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert train_losses(parts.events()) == train_losses(whole.events())
