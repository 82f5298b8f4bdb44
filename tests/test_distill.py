"""Distillation methods through the real trainer: frozen parts stay frozen, gradients reach what
trains, the teacher is neither trained nor saved, bad teachers and recipes fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data import augment as aug
from engine.data.embedded import CLASS_NAMES
from engine.errors import CheckpointError
from engine.methods import losses
from engine.models import build_model
from engine.recipe import RecipeError, load_recipe
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, Trainer, train
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare

BASE = """
[run]
method = "{method}"
[data]
dataset = "embedded"
batch_size = 16
eval_batch_size = 256
val_fraction = 0.2
embedded_per_class = 8
image_size = 16
[model]
arch = "{arch}"
[optim]
lr = 0.1
[schedule]
name = "constant"
[train]
epochs = 2
seed = 3
threads = 1
max_steps_per_epoch = 3
"""


def fake_checkpoint(path: Path, arch: str, num_classes: int = 10, dataset: str = "embedded", seed: int = 0) -> Path:
    """A kdtui checkpoint of a randomly initialised net, with BN running stats made non-trivial."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.uniform_(-0.2, 0.2)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    names = list(CLASS_NAMES) if dataset == "embedded" else [f"c{i}" for i in range(num_classes)]
    save_checkpoint({"model": model.state_dict(), "arch": arch, "num_classes": num_classes, "dataset": dataset,
                     "class_names": names}, path)
    return path


def make_trainer(tmp_path: Path, method: str, arch: str, extra: str = "", runs: str = "runs") -> Trainer:
    recipe = write_recipe(tmp_path, BASE.format(method=method, arch=arch) + extra, f"{method}.toml")
    run = create_runs(prepare(recipe, None, tmp_path / runs), tmp_path / runs)[0]
    return Trainer(run)


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def one_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = next(trainer.data.train.batches(16, shuffle=False, drop_last=False, device="cpu"))
    return images, labels


# ---------------------------------------------------------------- frozen HSAKD teacher


def test_frozen_teacher_trains_only_the_branches(tmp_path: Path) -> None:
    backbone = fake_checkpoint(tmp_path / "plain.pt", "resnet8")
    trainer = make_trainer(tmp_path, "hsakd_teacher", "resnet8_aux",
                           f'[teacher]\ncheckpoint = "{backbone}"\n[teacher_training]\nfreeze_backbone = true\n')
    model = trainer.method.model
    assert_equal_states(clone_state(model.backbone), load_checkpoint(backbone)["model"])  # loaded strictly
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.backbone.parameters()}  # main fc included
    assert optimized == {id(p) for p in model.auxiliary_classifier.parameters()}
    branches_before = clone_state(model.auxiliary_classifier)
    trainer._train_epoch(0)  # real training steps
    assert trainer.progress.step == 3
    assert not model.backbone.training and model.auxiliary_classifier.training
    trainer.method.evaluate(trainer.data.val, 64)  # evaluation between epochs must not wake the backbone
    assert not model.backbone.training and model.auxiliary_classifier.training
    assert_equal_states(clone_state(model.backbone), load_checkpoint(backbone)["model"])  # weights + BN stats
    changed = [k for k, v in model.auxiliary_classifier.state_dict().items() if not torch.equal(v, branches_before[k])]
    assert len(changed) == len(branches_before)  # every branch weight and BN statistic moved


def test_frozen_teacher_can_start_from_the_backbone_of_an_aux_checkpoint(tmp_path: Path) -> None:
    source = fake_checkpoint(tmp_path / "aux.pt", "resnet8_aux")
    trainer = make_trainer(tmp_path, "hsakd_teacher", "resnet8_aux",
                           f'[teacher]\ncheckpoint = "{source}"\n[teacher_training]\nfreeze_backbone = true\n')
    expected = {k.removeprefix("backbone."): v for k, v in load_checkpoint(source)["model"].items()
                if k.startswith("backbone.")}
    assert_equal_states(clone_state(trainer.method.model.backbone), expected)


def test_frozen_teacher_refuses_a_backbone_of_another_arch_or_dataset(tmp_path: Path) -> None:
    wrong_arch = fake_checkpoint(tmp_path / "r14.pt", "resnet14")
    with pytest.raises(CheckpointError, match="pretrained backbone is 'resnet14', expected 'resnet8'"):
        make_trainer(tmp_path, "hsakd_teacher", "resnet8_aux",
                     f'[teacher]\ncheckpoint = "{wrong_arch}"\n[teacher_training]\nfreeze_backbone = true\n')
    cifar = fake_checkpoint(tmp_path / "c100.pt", "resnet8", num_classes=100, dataset="cifar100")
    with pytest.raises(CheckpointError, match=r"trained on cifar100 \(100 classes\) but this run.s data set"):
        make_trainer(tmp_path, "hsakd_teacher", "resnet8_aux",
                     f'[teacher]\ncheckpoint = "{cifar}"\n[teacher_training]\nfreeze_backbone = true\n', runs="r2")


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(("method", "arch", "extra"), [
    ("hsakd_teacher", "resnet8_aux", ""),
    ("hsakd", "resnet8_aux", "[distill]\naux_stage = 2\n"),
    ("kd", "resnet8", "[distill]\naux_stage = 1\n"),
    ("teacher_target", "resnet8", ""),
    ("supervised_aux", "resnet8", "[distill]\naux_stage = 2\n"),
])
def test_gradients_reach_every_trainable_parameter_and_never_the_teacher(
        tmp_path: Path, method: str, arch: str, extra: str) -> None:
    if method in ("hsakd", "kd", "teacher_target"):
        extra += f'[teacher]\ncheckpoint = "{fake_checkpoint(tmp_path / "t.pt", "resnet8_aux")}"\n'
    trainer = make_trainer(tmp_path, method, arch, extra)
    images, labels = one_batch(trainer)
    trainer.method.train_mode()
    out = trainer.method.train_step(images, labels, torch.Generator().manual_seed(0))
    out["loss"].backward()
    trained = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for m in trainer.method.modules_to_save().values() for n, p in m.named_parameters()}
    assert len(trained) == len(names)  # the optimizer holds every saved parameter (the aux head too)
    for p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0, names[id(p)]
    teacher = getattr(trainer.method, "teacher", None)
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


# ---------------------------------------------------------------- the teacher stays frozen and unsaved


@pytest.mark.parametrize(("method", "arch"), [("hsakd", "resnet8_aux"), ("kd", "resnet8")])
def test_teacher_unchanged_by_training_and_not_saved(tmp_path: Path, method: str, arch: str) -> None:
    teacher_path = fake_checkpoint(tmp_path / "t.pt", "resnet8_aux")
    trainer = make_trainer(tmp_path, method, arch, f'[teacher]\ncheckpoint = "{teacher_path}"\n'
                                                   "[distill]\naux_stage = 2\n")
    student_before = clone_state(trainer.method.model)
    trainer._train_epoch(0)
    teacher = trainer.method.teacher
    assert not teacher.model.training
    assert_equal_states(clone_state(teacher.model), load_checkpoint(teacher_path)["model"])  # incl. BN stats
    assert not all(torch.equal(v, student_before[k]) for k, v in trainer.method.model.state_dict().items())
    state = trainer._state()
    assert set(state["modules"]) == {"model", "aux_head"}
    assert state["arch"] == arch and state["model"].keys() == student_before.keys()


def test_resumed_student_reloads_its_teacher_and_matches_an_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_path = fake_checkpoint(tmp_path / "t.pt", "resnet8_aux")
    text = BASE.format(method="hsakd", arch="resnet8_aux") + f'[teacher]\ncheckpoint = "{teacher_path}"\n'
    recipe = write_recipe(tmp_path, text.replace("epochs = 2", "epochs = 2\neval_every = 5"), "s.toml")
    runs = tmp_path / "runs"
    reference, interrupted = (create_runs(prepare(recipe, None, runs), runs)[0] for _ in range(2))
    assert train(reference.path) == EXIT_FINISHED
    original = Trainer._end_of_epoch_checkpoints

    def die_after_epoch_one(self: Trainer, evals: dict) -> None:
        original(self, evals)
        if self.progress.epoch == 1:
            raise SystemExit("simulated kill")

    monkeypatch.setattr(Trainer, "_end_of_epoch_checkpoints", die_after_epoch_one)
    with pytest.raises(SystemExit):
        train(interrupted.path)
    monkeypatch.undo()
    assert train(interrupted.path, resume=True) == EXIT_FINISHED
    assert_equal_states(load_checkpoint(reference.checkpoints / "last.pt")["model"],
                        load_checkpoint(interrupted.checkpoints / "last.pt")["model"])


# ---------------------------------------------------------------- losses wired to the right tensors


@pytest.mark.parametrize("method", ["hsakd", "kd", "supervised_aux"])
def test_train_step_loss_matches_a_direct_computation(tmp_path: Path, method: str) -> None:
    arch = "resnet8_aux" if method == "hsakd" else "resnet8"
    extra = "[distill]\naux_stage = 2\n"
    if method != "supervised_aux":
        extra += f'[teacher]\ncheckpoint = "{fake_checkpoint(tmp_path / "t.pt", "resnet8_aux")}"\n'
    trainer = make_trainer(tmp_path, method, arch, extra)
    m = trainer.method
    images, labels = one_batch(trainer)
    m.train_mode()
    out = m.train_step(images, labels, torch.Generator().manual_seed(5))
    x = m.augment(images, torch.Generator().manual_seed(5))  # the same crops and flips
    if method == "hsakd":
        x = aug.rotate4(x)
        s_main, s_aux = m.model(x)
        t_main, t_aux = m.teacher.model(x)
        expected = losses.hsakd_student_loss(s_main, s_aux, t_main, t_aux, labels)["loss"]
        deep = losses.hsakd_student_loss(m.aux_head(m.model.backbone.stage_features(x)[1]), [], t_main, [], labels)
    else:
        s_main = m.model(x)
        head = m.aux_head(m.model.stage_features(x)[1])
        if method == "kd":
            t_main = m.teacher.model(x)[0]
            expected, deep = losses.kd_loss(s_main, t_main, labels)["loss"], losses.kd_loss(head, t_main, labels)
        else:
            expected, deep = F.cross_entropy(s_main, labels), {"loss": F.cross_entropy(head, labels)}
    assert out["loss"].item() == pytest.approx((expected + 0.7 * deep["loss"]).item(), rel=1e-5)


def test_teacher_evaluate_reports_main_and_every_branch(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, "hsakd_teacher", "resnet8_aux")
    metrics = trainer.method.evaluate(trainer.data.val, 64)
    expected = {"loss", "top1", "top5"} | {f"aux{i}_{kind}_top1" for i in (1, 2, 3) for kind in ("joint", "class")}
    assert set(metrics) == expected and all(0 <= v <= 1 for k, v in metrics.items() if k != "loss")
    # main head metrics equal the plain evaluation of the un-rotated images
    plain = type(trainer.method).__mro__[1].evaluate(trainer.method, trainer.data.val, 64)
    assert metrics["top1"] == pytest.approx(plain["top1"]) and metrics["loss"] == pytest.approx(plain["loss"], rel=1e-5)


# ---------------------------------------------------------------- bad input: one line, before training


def test_teacher_of_another_dataset_is_a_clear_error(tmp_path: Path) -> None:
    cifar = fake_checkpoint(tmp_path / "c100.pt", "resnet8_aux", num_classes=100, dataset="cifar100")
    with pytest.raises(CheckpointError) as err:
        make_trainer(tmp_path, "kd", "resnet8", f'[teacher]\ncheckpoint = "{cifar}"\n')
    assert "\n" not in str(err.value) and "cifar100 (100 classes)" in str(err.value) and "embedded" in str(err.value)
    # the engine process turns it into a failed run with that line and exit code 2
    from engine.__main__ import main

    recipe = write_recipe(tmp_path, BASE.format(method="kd", arch="resnet8") + f'[teacher]\ncheckpoint = "{cifar}"\n')
    run = create_runs(prepare(recipe, None, tmp_path / "r2"), tmp_path / "r2")[0]
    assert main([str(run.path)]) == 2
    info = RunDir(run.path).read_info()
    assert info["status"] == "failed" and "trained on cifar100" in info["error"]


def test_hsakd_needs_a_teacher_with_branches(tmp_path: Path) -> None:
    plain = fake_checkpoint(tmp_path / "plain.pt", "resnet8")
    with pytest.raises(CheckpointError, match="has no auxiliary branches; hsakd needs an \\*_aux teacher"):
        make_trainer(tmp_path, "hsakd", "resnet8_aux", f'[teacher]\ncheckpoint = "{plain}"\n')


@pytest.mark.parametrize(("extra", "key", "words"), [
    ('[run]\nmethod = "kd"\n', "teacher", "needs a teacher"),
    ('[run]\nmethod = "hsakd"\n[teacher]\ncheckpoint = "r.toml"\n', "model.arch", "needs an *_aux"),
    ('[run]\nmethod = "kd"\n[model]\narch = "resnet8_aux"\n[teacher]\ncheckpoint = "r.toml"\n', "model.arch",
     "plain student"),
    ('[run]\nmethod = "hsakd_teacher"\n[model]\narch = "resnet8_aux"\n[teacher_training]\nfreeze_backbone = true\n',
     "teacher", "pretrained plain backbone"),
    ('[run]\nmethod = "hsakd_teacher"\n[model]\narch = "resnet8_aux"\n[teacher]\ncheckpoint = "r.toml"\n',
     "teacher", "would ignore"),
    ("[teacher_training]\nfreeze_backbone = true\n", "teacher_training.freeze_backbone", "only method hsakd_teacher"),
    ('[run]\nmethod = "supervised_aux"\n', "distill.aux_stage", "needs the stage"),
    ("[distill]\naux_stage = 2\n", "distill.aux_stage", "no deep supervision"),
    ('[distill]\nalpha = 1.5\n', "distill.alpha", "less than or equal to 1"),
])
def test_inconsistent_distill_recipes_are_one_line_errors(tmp_path: Path, extra: str, key: str, words: str) -> None:
    path = write_recipe(tmp_path, extra)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.key == key and words in err.value.message and "\n" not in str(err.value)


def test_aux_stage_out_of_range_names_the_valid_stages(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"intermediate stages 1\.\.3, got 4"):
        make_trainer(tmp_path, "supervised_aux", "resnet8", "[distill]\naux_stage = 4\n")

