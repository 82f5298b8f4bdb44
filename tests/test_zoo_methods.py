"""The distillation zoo's methods through the real trainer: the feature loss reaches the student
and the method's own modules (which are optimised, saved as modules["distill"] and restored on
resume), never the teacher, whose weights and BN statistics stay as loaded; FitNets' hint stage
trains only the layers up to the hint and is logged as phase "init"; DKD's warm-up follows the
trainer's epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.methods.zoo.dkd import dkd_loss
from engine.recipe import RecipeError
from engine.trainer import EXIT_FINISHED, Trainer
from tests.conftest import write_recipe
from tests.test_distill import BASE, assert_equal_states, clone_state, fake_checkpoint, one_batch
from tui.launcher import create_runs, prepare

SHORT = BASE.replace("epochs = 2", "epochs = 1").replace("max_steps_per_epoch = 3", "max_steps_per_epoch = 2")
# teacher per method: a 4x wider one where the method bridges widths, an equal-width one for kdsvd
TEACHERS = {"at": "resnet8x4", "sp": "resnet8x4", "cc": "resnet8x4", "rkd": "resnet8x4", "pkt": "resnet8x4",
            "nst": "resnet8x4", "kdsvd": "resnet14", "dkd": "resnet14", "fitnet": "resnet8x4", "vid": "resnet8x4"}
WITH_MODULES = ("cc", "fitnet", "vid")


def zoo_trainer(tmp_path: Path, method: str, extra: str = "", teacher_arch: str | None = None,
                text: str = SHORT) -> tuple[Trainer, Path]:
    teacher = fake_checkpoint(tmp_path / "teacher.pt", teacher_arch or TEACHERS[method])
    recipe = write_recipe(tmp_path, text.format(method=method, arch="resnet8") +
                          f'[teacher]\ncheckpoint = "{teacher}"\n' + extra, f"{method}.toml")
    run = create_runs(prepare(recipe, None, tmp_path / "runs"), tmp_path / "runs")[0]
    return Trainer(run), teacher


def events(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in trainer.run.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(TEACHERS))
def test_feature_loss_reaches_student_and_modules_never_the_teacher(tmp_path: Path, method: str) -> None:
    trainer, _ = zoo_trainer(tmp_path, method)
    m = trainer.method
    images, labels = one_batch(trainer)
    m.train_mode()
    x = m.augment(images, torch.Generator().manual_seed(0))
    loss = m.feature_loss(m.model(x, features=True), m.teacher.features(x), labels, None)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()  # the method's own term alone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_feature_parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.model.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in m.model.parameters()} <= optimised
    assert (len(m.distill_modules) > 0) == (method in WITH_MODULES)
    for name, p in m.distill_modules.named_parameters():
        assert id(p) in optimised, name
        assert p.grad is not None, name
        if not name.endswith("conv.bias"):  # fitnet: a conv bias right before BatchNorm cancels out
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", sorted(TEACHERS))
def test_training_saves_the_modules_and_leaves_the_teacher_as_loaded(tmp_path: Path, method: str) -> None:
    trainer, teacher_path = zoo_trainer(tmp_path, method)
    m = trainer.method
    student_before, modules_before = clone_state(m.model), clone_state(m.distill_modules)
    assert trainer.fit() == EXIT_FINISHED
    assert_equal_states(clone_state(m.teacher.model), load_checkpoint(teacher_path)["model"])  # weights + BN stats
    assert not m.teacher.model.training
    train_events = [e for e in events(trainer) if e["split"] == "train"]
    assert train_events and all(e["loss_feat"] > 0 for e in train_events)
    last = load_checkpoint(trainer.run.checkpoints / "last.pt")
    assert any(not torch.equal(v, student_before[k]) for k, v in last["modules"]["model"].items())
    if method not in WITH_MODULES:
        assert set(last["modules"]) == {"model"}
        return
    assert set(last["modules"]) == {"model", "distill"}
    saved = last["modules"]["distill"]
    assert_equal_states(saved, clone_state(m.distill_modules))
    assert all(not torch.equal(v, modules_before[k]) for k, v in saved.items()
               if v.is_floating_point() and not k.endswith("conv.bias"))  # every module weight trained
    resumed = Trainer(trainer.run, resume=True).method
    assert_equal_states(clone_state(resumed.distill_modules), saved)


# ---------------------------------------------------------------- fitnet's hint stage


def test_fitnet_hint_stage_trains_only_the_layers_up_to_the_hint_then_everything(tmp_path: Path) -> None:
    trainer, teacher_path = zoo_trainer(tmp_path, "fitnet", "[distill]\ninit_epochs = 1\n")
    m = trainer.method
    assert [p.name for p in trainer.phases] == ["init", "train"]
    names = {id(p): n for n, p in m.model.named_parameters()}
    hint = {names[id(p)] for p in m.hint_parameters}
    assert hint == {n for n in names.values() if n.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")}
    init_optimised = [p for g in trainer.phases[0].optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in init_optimised} == ({id(p) for p in m.hint_parameters}
                                              | {id(p) for p in m.distill_modules.parameters()})
    student_before, modules_before = clone_state(m.model), clone_state(m.distill_modules)

    assert trainer.fit() == EXIT_FINISHED
    after_init = load_checkpoint(trainer.run.checkpoints / "epoch_0001.pt")["modules"]
    for key, value in after_init["model"].items():
        moved = not torch.equal(value, student_before[key])
        if key.split(".")[0] in ("layer3", "fc"):  # past the hint: weights and BN statistics untouched
            assert not moved, key
        elif value.is_floating_point():
            assert moved, key
    assert all(not torch.equal(v, modules_before[k]) for k, v in after_init["distill"].items()
               if v.is_floating_point() and not k.endswith("conv.bias"))
    last = load_checkpoint(trainer.run.checkpoints / "last.pt")["modules"]["model"]
    assert all(not torch.equal(last[k], after_init["model"][k]) for k in last
               if k.split(".")[0] in ("layer3", "fc") and last[k].is_floating_point())
    assert_equal_states(clone_state(m.teacher.model), load_checkpoint(teacher_path)["model"])

    log = events(trainer)
    init = [e for e in log if e.get("phase") == "init"]
    assert init and all(e["epoch"] == 1 and e["split"] == "train" and "loss_init" in e and "loss_ce" not in e
                        for e in init)
    main = [e for e in log if e.get("phase") == "train"]
    assert main and all(e["epoch"] == 2 and "loss_feat" in e for e in main)
    assert {e["epoch"] for e in log if e["split"] == "val"} == {2}  # the hint stage evaluates nothing


def test_fitnet_trains_the_hint_jointly_by_default(tmp_path: Path) -> None:
    trainer, _ = zoo_trainer(tmp_path, "fitnet")
    assert [p.name for p in trainer.phases] == ["train"] and trainer.method.hint_parameters == []


def test_fitnet_refuses_the_pooled_vector_as_hint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"hint_layer: the student has feature maps 0\.\.3 .* got 4"):
        zoo_trainer(tmp_path, "fitnet", "[distill.fitnet]\nhint_layer = 4\n")


# ---------------------------------------------------------------- recipe checks


def test_kdsvd_refuses_teachers_of_other_widths_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kdsvd: stage 1 has 16 student channels and 64 teacher channels"):
        zoo_trainer(tmp_path, "kdsvd", teacher_arch="resnet8x4")


def test_vid_initial_variance_must_exceed_its_floor(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"distill\.vid: init_pred_var \(1e-06\) must exceed eps"):
        zoo_trainer(tmp_path, "vid", "[distill.vid]\ninit_pred_var = 1e-6\n")


# ---------------------------------------------------------------- dkd


def test_dkd_warmup_follows_the_trainers_epoch(tmp_path: Path) -> None:
    trainer, _ = zoo_trainer(tmp_path, "dkd", "[distill.dkd]\nwarmup_epochs = 4\nbeta = 2.0\n")
    m = trainer.method
    images, labels = one_batch(trainer)
    x = m.augment(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        student, teacher = m.model(x, features=True), m.teacher.features(x)
        full = dkd_loss(student.logits, teacher.logits, labels, 1.0, 2.0, 4.0)
        for epoch, factor in ((1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
            m.epoch = epoch
            assert torch.allclose(m.feature_loss(student, teacher, labels, None), factor * full, rtol=1e-6)
    trainer._train_epoch(1)  # the trainer sets the 1-based epoch before the epoch's steps
    assert m.epoch == 2


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("method", ["sp", "rkd", "pkt", "nst", "kdsvd"])
def test_relational_losses_ignore_autocast(tmp_path: Path, method: str) -> None:
    """Gram matrices, distances, kernels and SVDs run in float32 under bf16 autocast (PKT's beta of
    3e4 would amplify bf16 rounding; there is no bf16 SVD)."""
    trainer, _ = zoo_trainer(tmp_path, method)
    m = trainer.method
    images, labels = one_batch(trainer)
    x = m.augment(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        student, teacher = m.model(x, features=True), m.teacher.features(x)
        full = m.feature_loss(student, teacher, labels, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = m.feature_loss(student, teacher, labels, None)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, full, rtol=1e-6)
