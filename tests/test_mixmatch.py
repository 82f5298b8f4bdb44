"""MixMatch's pieces against hand-computed values, and the method through the real trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.checkpoint import load_checkpoint
from engine.evaluate import evaluate_checkpoint
from engine.methods.mixmatch import draw, labelled_subset
from engine.methods.ssl_losses import (
    ema_update,
    guess_labels,
    interleave,
    linear_rampup,
    mixup,
    probability_mse,
    sample_mix_lambda,
    sharpen,
    soft_cross_entropy,
)
from engine.trainer import EXIT_FINISHED, Trainer, train
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare


def test_sharpen_by_hand() -> None:
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.2]])[:2]
    out = sharpen(p, 0.5)  # squares, renormalised: 0.36 / 0.52, 0.16 / 0.52
    assert out[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52])
    assert out[1].tolist() == pytest.approx([0.5, 0.5])
    assert sharpen(torch.tensor([[0.2, 0.3, 0.5]]), 1.0).tolist()[0] == pytest.approx([0.2, 0.3, 0.5])
    cold = sharpen(torch.tensor([[0.2, 0.3, 0.5]]), 0.01)[0]  # T -> 0: one-hot at the arg-max
    assert cold[2] == pytest.approx(1.0, abs=1e-6)


def test_label_guess_is_the_mean_softmax_over_views() -> None:
    view1 = torch.tensor([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    view2 = torch.tensor([[math.log(3.0), 0.0]])  # softmax [0.75, 0.25]
    view3 = torch.tensor([[0.0, 0.0]])  # softmax [0.5, 0.5]
    assert guess_labels([view1, view2]).tolist()[0] == pytest.approx([0.5, 0.5])
    assert guess_labels([view1, view3]).tolist()[0] == pytest.approx([0.375, 0.625])


def test_mixup_mixes_inputs_and_targets_with_the_same_partner() -> None:
    x = torch.tensor([[1.0], [3.0], [10.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mixed_x, mixed_y = mixup(x, y, 0.7, torch.tensor([1, 0, 2]))
    assert mixed_x.flatten().tolist() == pytest.approx([0.7 * 1 + 0.3 * 3, 0.7 * 3 + 0.3 * 1, 10.0])
    assert mixed_y.tolist()[0] == pytest.approx([0.7, 0.3]) and mixed_y.tolist()[2] == pytest.approx([0.5, 0.5])


def test_mix_lambda_is_at_least_a_half_and_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    draws = [sample_mix_lambda(0.75, g) for _ in range(2000)]
    assert all(0.5 <= lam <= 1.0 for lam in draws)
    # l ~ Beta(a, a): E max(l, 1 - l) = 1/2 + E|l - 1/2| = 1/2 + 1 / (4^a a B(a, a)) = 0.77821 for a = 0.75
    a = 0.75
    expected = 0.5 + 1 / (4**a * a * math.gamma(a) ** 2 / math.gamma(2 * a))
    assert expected == pytest.approx(0.77821, abs=1e-5)
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.015)
    again = torch.Generator().manual_seed(0)
    assert [sample_mix_lambda(0.75, again) for _ in range(5)] == draws[:5]


def test_interleave_puts_labelled_rows_in_every_pass_and_is_its_own_inverse() -> None:
    batch = 5
    chunks = [torch.full((batch,), float(group)) for group in range(3)]  # labelled, unlabelled view 1, view 2
    mixed = interleave(chunks, batch)
    assert set(mixed[0].tolist()) == {0.0, 1.0, 2.0}
    assert set(mixed[1].tolist()) == {0.0, 1.0} and set(mixed[2].tolist()) == {0.0, 2.0}
    # slices of 5 rows over 3 groups are [1, 2, 2]: pass 0 swaps its slice 1 with pass 1's, slice 2 with pass 2's
    assert mixed[0].tolist() == [0, 1, 1, 2, 2] and mixed[1].tolist() == [1, 0, 0, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(interleave(mixed, batch), chunks, strict=True))


def test_losses_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    assert float(soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]]))) == pytest.approx(
        -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))
    # Lu: ((0.25 - 1)^2 + (0.75 - 0)^2) / 2 classes
    assert float(probability_mse(logits, torch.tensor([[1.0, 0.0]]))) == pytest.approx(0.5625)


def test_linear_rampup() -> None:
    assert [linear_rampup(s, 100) for s in (0, 25, 100, 250)] == [0.0, 0.25, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0


def test_ema_update_by_hand() -> None:
    model, ema = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.999)
    assert ema.weight.tolist() == pytest.approx([1.002, 1.002])  # 0.999 * 1 + 0.001 * 3
    assert ema.running_mean.tolist() == pytest.approx([0.002, 0.002])  # batch-norm statistics too
    assert int(ema.num_batches_tracked) == 7 and model.weight.tolist() == [3.0, 3.0]


def test_labelled_subset_is_balanced_seeded_and_disjoint() -> None:
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(3))]
    labelled, unlabelled = labelled_subset(labels, 40, 10, seed=5)
    assert torch.bincount(labels[labelled], minlength=10).tolist() == [4] * 10
    assert len(unlabelled) == 260 and not set(labelled.tolist()) & set(unlabelled.tolist())
    assert torch.equal(labelled, labelled_subset(labels, 40, 10, seed=5)[0])
    assert not torch.equal(labelled, labelled_subset(labels, 40, 10, seed=6)[0])
    with pytest.raises(ValueError, match="multiple of 10"):
        labelled_subset(labels, 45, 10, seed=0)
    with pytest.raises(ValueError, match="unlabelled"):
        labelled_subset(labels, 300, 10, seed=0)
    rows = draw(labelled, 8, torch.Generator().manual_seed(0))
    assert len(set(rows.tolist())) == 8 and set(rows.tolist()) <= set(labelled.tolist())


MIXMATCH = """
[run]
name = "mm"
method = "mixmatch"
[data]
dataset = "embedded"
embedded_per_class = 12
val_fraction = 0.2
batch_size = 16
[model]
arch = "resnet8"
[optim]
name = "adamw"
lr = 0.002
weight_decay = 0.02
[schedule]
name = "constant"
[train]
epochs = 2
threads = 1
log_every = 1
[semi]
num_labels = 20
rampup_steps = 4
ema_decay = 0.9
"""


def test_mixmatch_trains_evaluates_its_ema_and_resumes_bit_exactly(tmp_path: Path, runs_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, MIXMATCH)
    reference = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    assert train(reference.path) == EXIT_FINISHED
    steps = [e for e in reference.events() if e.get("kind") == "step"]
    assert len(steps) == 12 and {"loss_x", "loss_u", "lambda_u"} <= steps[0].keys()
    # lambda_u ramps 75 * step / 4 from step 0 and stays at 75
    assert [e["lambda_u"] for e in steps[:6]] == pytest.approx([0, 18.75, 37.5, 56.25, 75, 75])
    state = load_checkpoint(reference.checkpoints / "last.pt")
    ema, raw = state["model"], state["modules"]["model"]
    assert state["extra"]["step"] == 12 and all(torch.equal(ema[k], state["modules"]["ema"][k]) for k in ema)
    assert not torch.equal(ema["fc.weight"], raw["fc.weight"])
    # the logged test accuracy is the EMA's, and `kdtui eval` reproduces it from the checkpoint
    logged = [e for e in reference.events() if e["split"] == "test"][-1]
    assert evaluate_checkpoint(reference.checkpoints / "last.pt")["top1"] == pytest.approx(logged["top1"])

    stopped = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    original = Trainer._step

    def stop_mid_epoch_two(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step == 8:
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", stop_mid_epoch_two)
    assert train(stopped.path) == 130
    monkeypatch.undo()
    assert train(stopped.path, resume=True) == EXIT_FINISHED
    resumed = load_checkpoint(stopped.checkpoints / "last.pt")
    for key, value in state["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
