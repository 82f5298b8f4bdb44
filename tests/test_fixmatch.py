"""FixMatch: the pseudo-label mask and loss by hand, the weak view's reflect crop, the same labelled rows
as MixMatch, and the method through the real trainer with a bit-exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.data import augment as A
from engine.data import build_data
from engine.evaluate import evaluate_checkpoint
from engine.methods.fixmatch import FixMatch, pseudo_labels, unlabelled_loss
from engine.methods.mixmatch import MixMatch, draw
from engine.recipe import load_recipe
from engine.trainer import EXIT_FINISHED, Trainer, train
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare


def test_pseudo_label_mask_and_loss_by_hand() -> None:
    weak = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # p = 1/4 exactly: at the threshold below
                         [4.0, 0.0, 0.0, 0.0],  # p = e^4 / (e^4 + 3) = 0.9479...
                         [0.0, 0.0, 6.0, 0.0],  # p = e^6 / (e^6 + 3) = 0.9926...
                         [1.0, 2.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    strong = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0],
                           [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    targets, mask = pseudo_labels(weak, threshold=0.95)
    assert targets.tolist() == [0, 0, 2, 1] and mask.tolist() == [False, False, True, False]
    assert pseudo_labels(weak, threshold=0.25)[1].tolist() == [True, True, True, True]  # >=: the tie counts
    assert pseudo_labels(weak, threshold=0.25 + 1e-12)[1].tolist() == [False, True, True, True]
    assert pseudo_labels(weak, threshold=0.95, temperature=0.5)[1].tolist() == [False, True, True, False]  # p^2
    loss = unlabelled_loss(strong, targets, mask)
    # only row 2 counts: CE of [0, 0, 0, 2] at class 2 = log(3 + e^2) - 0; mean over all 4 rows
    assert float(loss.detach()) == pytest.approx(math.log(3 + math.e ** 2) / 4, abs=1e-6)
    loss_all = unlabelled_loss(strong, targets, pseudo_labels(weak, threshold=0.0)[1])
    by_hand = [math.log(math.e + 3) - 1, math.log(math.e + 3), math.log(3 + math.e ** 2), math.log(4)]
    assert float(loss_all.detach()) == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    loss_all.backward()
    assert weak.grad is None and strong.grad is not None  # no gradient through the pseudo-label side
    assert strong.grad[0].abs().sum() > 0 and loss.dtype == torch.float64


def test_weak_view_reflect_crop_is_exact() -> None:
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, p = A.random_crop_flip(x, pad=4, generator=torch.Generator().manual_seed(1), reflect=True, return_params=True)
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for b in range(32):
        want = padded[b, :, int(p.dy[b]):int(p.dy[b]) + 8, int(p.dx[b]):int(p.dx[b]) + 8]
        assert torch.equal(out[b], want.flip(-1) if p.flip[b] else want), b
    zero_padded = A.random_crop_flip(x, pad=4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, zero_padded) and int((out == 0).sum()) < int((zero_padded == 0).sum())
    with pytest.raises(ValueError, match="reflect"):
        A.random_crop_flip(x, pad=8, reflect=True)


FIXMATCH = """
[run]
name = "fm"
method = "fixmatch"
[data]
dataset = "embedded"
embedded_per_class = 12
val_fraction = 0.2
batch_size = 8
[model]
arch = "resnet8"
[optim]
name = "sgd"
lr = 0.03
nesterov = true
[schedule]
name = "cosine"
per = "step"
period = 3
[train]
epochs = 2
max_steps_per_epoch = 2
threads = 1
log_every = 1
[semi]
num_labels = 20
mu = 2
threshold = 0.0
ema_decay = 0.9
"""


def test_labelled_rows_are_mixmatchs_and_weight_decay_skips_biases(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, FIXMATCH))
    data = build_data("embedded", "data", val_fraction=0.2, seed=recipe.train.seed, embedded_per_class=12)
    mixmatch_recipe = recipe.model_copy(update={"run": recipe.run.model_copy(update={"method": "mixmatch"})})
    fm, mm = FixMatch(recipe, data, torch.device("cpu")), MixMatch(mixmatch_recipe, data, torch.device("cpu"))
    assert torch.equal(fm.labelled, mm.labelled) and torch.equal(fm.unlabelled, mm.unlabelled)
    assert torch.bincount(data.train.labels[fm.labelled], minlength=10).tolist() == [2] * 10
    # the step's labelled rows are MixMatch's first draw from the same generator state
    out = fm.train_step(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                        torch.Generator().manual_seed(5))
    rows = draw(mm.labelled, 8, torch.Generator().manual_seed(5))
    assert torch.equal(out["labels"], data.train.labels[rows])
    assert 0 <= float(out["pseudo_correct"]) <= float(out["mask_rate"]) == 1.0  # threshold 0: every row
    decay, no_decay = fm.parameter_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in no_decay["params"]} == {1} and len(decay["params"]) + len(no_decay["params"]) == len(
        list(fm.model.parameters()))


def test_fixmatch_defaults_differ_from_mixmatchs_where_unset(tmp_path: Path) -> None:
    text = '[run]\nmethod = "fixmatch"\n[data]\ndataset = "embedded"\n'
    semi = load_recipe(write_recipe(tmp_path, text)).semi
    assert (semi.lambda_u, semi.temperature, semi.rampup_steps, semi.threshold, semi.mu) == (1.0, 1.0, 0, 0.95, 7)
    semi = load_recipe(write_recipe(tmp_path, text + "[semi]\nlambda_u = 2.0\n")).semi
    assert semi.lambda_u == 2.0
    mixmatch = load_recipe(write_recipe(tmp_path, text.replace("fixmatch", "mixmatch"))).semi
    assert (mixmatch.lambda_u, mixmatch.temperature, mixmatch.rampup_steps) == (75.0, 0.5, 16384)
    with pytest.raises(ValueError, match=r"semi\.alpha: unused by fixmatch"):
        load_recipe(write_recipe(tmp_path, text + "[semi]\nalpha = 0.5\n"))
    with pytest.raises(ValueError, match=r"semi\.mu: unused by mixmatch"):
        load_recipe(write_recipe(tmp_path, text.replace("fixmatch", "mixmatch") + "[semi]\nmu = 3\n"))


def test_fixmatch_trains_evaluates_its_ema_and_resumes_bit_exactly(tmp_path: Path, runs_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, FIXMATCH)
    reference = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    assert train(reference.path) == EXIT_FINISHED
    steps = [e for e in reference.events() if e.get("kind") == "step"]
    assert len(steps) == 4
    assert {"loss_x", "loss_u", "mask_rate", "pseudo_top1", "pseudo_correct", "lambda_u", "top1"} <= steps[0].keys()
    assert all(e["mask_rate"] == 1.0 and e["lambda_u"] == 1.0 and e["loss_u"] > 0 for e in steps)
    state = load_checkpoint(reference.checkpoints / "last.pt")
    ema, raw = state["model"], state["modules"]["model"]
    assert state["extra"]["step"] == 4 and all(torch.equal(ema[k], state["modules"]["ema"][k]) for k in ema)
    assert not torch.equal(ema["fc.weight"], raw["fc.weight"])
    logged = [e for e in reference.events() if e["split"] == "test"][-1]
    assert evaluate_checkpoint(reference.checkpoints / "last.pt")["top1"] == pytest.approx(logged["top1"])

    stopped = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    original = Trainer._step

    def stop_mid_epoch_two(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step == 3:
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", stop_mid_epoch_two)
    assert train(stopped.path) == 130
    monkeypatch.undo()
    assert train(stopped.path, resume=True) == EXIT_FINISHED
    resumed = load_checkpoint(stopped.checkpoints / "last.pt")
    for key, value in state["modules"]["model"].items():
        assert torch.equal(value, resumed["modules"]["model"][key]), key
    for key, value in state["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
