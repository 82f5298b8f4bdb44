"""The zoo's methods with an initialisation phase: ab, ft, fsp.

Each loss against numbers worked out by hand or by an independent (loop) formula in float64;
then through the real trainer: the init phase's events, what moves in each phase (and what must
not: the teacher, ft's paraphraser, ab's connector), the init-phase lr rule of ft, and a
bit-identical resume of ab interrupted inside its initialisation phase and again in the main one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.methods.zoo import ft as ft_module
from engine.methods.zoo.ab import Connector, ab_loss, boundary_loss
from engine.methods.zoo.fitnet import ConvReg
from engine.methods.zoo.fsp import fsp_loss, fsp_matrices, fsp_matrix
from engine.methods.zoo.ft import Paraphraser, Translator, factor, factor_transfer_loss
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, EXIT_INTERRUPTED, Trainer, train
from tests.conftest import write_recipe
from tests.test_distill import BASE, assert_equal_states, clone_state, fake_checkpoint, make_trainer
from tui.launcher import create_runs, prepare

D = torch.float64

# ---------------------------------------------------------------- ab


def test_boundary_loss_by_hand() -> None:
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.5, -0.5], dtype=D)
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=D)
    # margin 1, element by element: -2 already past -m where the teacher is off: 0; -0.5 off: (s + 1)^2
    # = 0.25; 0.5 on: (s - 1)^2 = 0.25; 2 past +m where on: 0; 0.5 off: 2.25; -0.5 on: 2.25
    assert float(boundary_loss(s, t, 1.0)) == pytest.approx(5.0, abs=1e-12)
    # margin 0.5: -0.5 is not above -m (0); 0.5 on is at +m: (0.5 - 0.5)^2 = 0; the last two: 1 + 1
    assert float(boundary_loss(s, t, 0.5)) == pytest.approx(2.0, abs=1e-12)
    # the teacher is the target: swapping the sides changes the value
    assert float(boundary_loss(t, s, 1.0)) != pytest.approx(5.0)


def _boundary_by_loops(s: torch.Tensor, t: torch.Tensor, m: float) -> float:
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True):
        if b <= 0 and a > -m:
            total += (a + m) ** 2
        if b > 0 and a <= m:
            total += (a - m) ** 2
    return total


def test_ab_loss_weights_stages_divides_by_batch_and_scales() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4, 4), (2, 4, 2, 2), (2, 5, 1, 1)]
    s = [torch.randn(*sh, generator=g, dtype=D) * 2 for sh in shapes]
    t = [torch.randn(*sh, generator=g, dtype=D) for sh in shapes]
    expected = (0.25 * _boundary_by_loops(s[0], t[0], 1.0) + 0.5 * _boundary_by_loops(s[1], t[1], 1.0)
                + 1.0 * _boundary_by_loops(s[2], t[2], 1.0)) / 2 * 3 / 1000
    assert float(ab_loss(s, t, 1.0)) == pytest.approx(expected, rel=1e-9, abs=1e-6)


def test_connector_is_identity_where_shapes_match_and_convreg_elsewhere() -> None:
    same, wider, halved, doubled = (2, 16, 8, 8), (2, 64, 8, 8), (2, 32, 4, 4), (2, 8, 16, 16)
    c = Connector([torch.Size(same)] * 4, [torch.Size(x) for x in (same, wider, halved, doubled)])
    layers = list(c.layers)
    assert isinstance(layers[0], torch.nn.Identity) and all(isinstance(m, ConvReg) for m in layers[1:])
    assert isinstance(layers[2].conv, torch.nn.Conv2d) and layers[2].conv.stride == (2, 2)
    assert isinstance(layers[3].conv, torch.nn.ConvTranspose2d)
    out = c([torch.randn(same)] * 4)
    assert [tuple(o.shape) for o in out] == [same, wider, halved, doubled]
    assert not layers[1].use_relu and bool((out[1] < 0).any())  # RepDistiller's Connector: ConvReg without ReLU
    with pytest.raises(ValueError, match="ab: stage 1: cannot regress a 3x3 student map onto a 8x8"):
        Connector([torch.Size((2, 16, 3, 3))], [torch.Size(same)])


# ---------------------------------------------------------------- ft


def test_factor_by_hand() -> None:
    f = torch.tensor([[[[3.0, 0.0]], [[1.0, 2.0]]]], dtype=D)  # (1, 2 channels, 1, 2)
    # mean over channels of f^2: [(9 + 1) / 2, (0 + 4) / 2] = [5, 2], then unit norm
    expected = torch.tensor([[5.0, 2.0]], dtype=D) / math.sqrt(29)
    assert torch.allclose(factor(f, 2.0), expected, atol=1e-12)


def test_factor_transfer_loss_pools_the_larger_map_and_takes_the_mean_abs_difference() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g, dtype=D), torch.randn(2, 5, 2, 2, generator=g, dtype=D)
    pooled = s.view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 average pooling written out
    a = pooled.pow(2).mean(1).flatten(1)
    b = t.pow(2).mean(1).flatten(1)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    assert float(factor_transfer_loss(s, t, 2.0, 1)) == pytest.approx(float((a - b).abs().mean()), abs=1e-12)
    assert float(factor_transfer_loss(s, t, 2.0, 2)) == pytest.approx(float(((a - b) ** 2).mean()), abs=1e-12)
    assert float(factor_transfer_loss(t, s, 2.0, 1)) == pytest.approx(float((a - b).abs().mean()), abs=1e-12)


def test_paraphraser_has_no_bn_and_translator_has_bn() -> None:
    p, tr = Paraphraser(64, 0.5, bn=False), Translator(16, 64, 0.5, bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in p.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tr.modules()) == 3
    x = torch.randn(2, 64, 4, 4)
    assert p.encoder(x).shape == (2, 32, 4, 4) and p(x).shape == x.shape
    assert tr(torch.randn(2, 16, 4, 4)).shape == (2, 32, 4, 4)
    slopes = {m.negative_slope for m in p.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1}


# ---------------------------------------------------------------- fsp


def test_fsp_matrix_against_loops_with_pooling() -> None:
    g = torch.Generator().manual_seed(2)
    bottom, top = torch.randn(2, 3, 4, 4, generator=g, dtype=D), torch.randn(2, 5, 2, 2, generator=g, dtype=D)
    pooled = bottom.view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    got = fsp_matrix(bottom, top)
    assert got.shape == (2, 5, 3)  # (B, C_top, C_bottom), as distiller_zoo/FSP.py
    for b in range(2):
        for j in range(5):
            for i in range(3):
                want = sum(float(top[b, j, y, x] * pooled[b, i, y, x]) for y in range(2) for x in range(2)) / 4
                assert float(got[b, j, i]) == pytest.approx(want, abs=1e-12)


def test_fsp_loss_sums_mean_squared_differences_over_consecutive_pairs() -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 2, 4, 4), (2, 3, 4, 4), (2, 4, 2, 2)]
    s = [torch.randn(*sh, generator=g, dtype=D) for sh in shapes]
    t = [torch.randn(*sh, generator=g, dtype=D) for sh in shapes]
    gs, gt = fsp_matrices(s), fsp_matrices(t)
    assert [tuple(x.shape) for x in gs] == [(2, 3, 2), (2, 4, 3)]
    expected = sum(float(((a - b) ** 2).sum()) / a.numel() for a, b in zip(gs, gt, strict=True))
    assert float(fsp_loss(s, t)) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- through the trainer

TEACHERS = {"ab": "resnet8x4", "ft": "resnet14", "fsp": "resnet14"}  # ab: a wider teacher gives real connectors


def zoo_trainer(tmp_path: Path, method: str, extra: str = "", init_epochs: int = 1) -> Trainer:
    ckpt = fake_checkpoint(tmp_path / f"{method}_teacher.pt", TEACHERS[method])
    return make_trainer(tmp_path, method, "resnet8",
                        f'[teacher]\ncheckpoint = "{ckpt}"\n[distill]\ninit_epochs = {init_epochs}\n{extra}')


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def optimized(trainer: Trainer, phase: int) -> set[int]:
    return {id(p) for g in trainer.phases[phase].optimizer.param_groups for p in g["params"]}


def run_phase(trainer: Trainer, index: int) -> None:
    trainer.phase = trainer.phases[index]
    trainer.progress.batch_in_epoch = 0  # what fit() does between epochs
    trainer._train_epoch(trainer.phase.start)
    assert trainer.progress.batch_in_epoch == trainer.steps_per_epoch == 3


@pytest.mark.parametrize("method", ["ab", "ft", "fsp"])
def test_init_phase_events_come_first_and_evaluate_nothing(tmp_path: Path, method: str) -> None:
    trainer = zoo_trainer(tmp_path, method, init_epochs=2)
    assert [(p.name, p.start, p.end, p.evaluate) for p in trainer.phases] == [
        ("init", 0, 2, False), ("train", 2, 4, True)]
    assert trainer.fit() == EXIT_FINISHED
    events = trainer.run.events()
    train_events = [e for e in events if e["split"] == "train"]
    assert {e["epoch"]: e["phase"] for e in train_events} == {1: "init", 2: "init", 3: "train", 4: "train"}
    assert all("loss_init" in e for e in train_events if e["phase"] == "init")
    assert not any("loss_init" in e for e in train_events if e["phase"] == "train")
    assert sorted(e["epoch"] for e in events if e["split"] == "val") == [3, 4]
    assert trainer.run.read_info()["epochs"] == 4


def test_ab_init_trains_connector_and_student_features_then_freezes_the_connector(tmp_path: Path) -> None:
    trainer = zoo_trainer(tmp_path, "ab")
    method = trainer.method
    student, connector = method.model, method.distill_modules["connector"]
    assert len(list(connector.parameters())) > 0  # resnet8 -> resnet8x4: 1x1 ConvReg on every stage
    head = {id(p) for p in student.classifier.parameters()}
    assert optimized(trainer, 0) == {id(p) for p in connector.parameters()} | {
        id(p) for p in student.parameters() if id(p) not in head}
    assert optimized(trainer, 1) == {id(p) for p in student.parameters()}  # no connector in the main phase
    s0, c0 = clone_state(student), clone_state(connector)
    run_phase(trainer, 0)
    assert changed(s0, student) == {k for k in s0 if not k.startswith("fc.")}  # weights and BN statistics
    assert changed(c0, connector) == set(c0)
    assert student.training and connector.training
    s1, c1 = clone_state(student), clone_state(connector)
    run_phase(trainer, 1)
    assert not connector.training and not any(p.requires_grad for p in connector.parameters())
    assert changed(c1, connector) == set()  # frozen: no step, no BN statistics
    assert {"fc.weight", "fc.bias"} <= changed(s1, student)
    assert_equal_states(clone_state(method.teacher.model), load_checkpoint(method.teacher.path)["model"])


def test_ft_init_trains_only_the_paraphraser_then_only_translator_and_student(tmp_path: Path) -> None:
    trainer = zoo_trainer(tmp_path, "ft")
    method = trainer.method
    student, para, trans = method.model, method.distill_modules["paraphraser"], method.distill_modules["translator"]
    assert optimized(trainer, 0) == {id(p) for p in para.parameters()}
    assert optimized(trainer, 1) == {id(p) for p in [*student.parameters(), *trans.parameters()]}
    s0, p0, t0 = clone_state(student), clone_state(para), clone_state(trans)
    run_phase(trainer, 0)
    assert changed(p0, para) == set(p0)
    assert changed(s0, student) == set() and changed(t0, trans) == set()  # the student stays in eval mode
    s1, p1, t1 = clone_state(student), clone_state(para), clone_state(trans)
    run_phase(trainer, 1)
    assert changed(p1, para) == set() and not para.training
    assert changed(t1, trans) == set(t1) and changed(s1, student) == set(s1)
    assert_equal_states(clone_state(method.teacher.model), load_checkpoint(method.teacher.path)["model"])


def test_ft_main_phase_gradients_reach_translator_and_student_never_the_paraphraser(tmp_path: Path) -> None:
    trainer = zoo_trainer(tmp_path, "ft", "kd_weight = 0\n")
    method = trainer.method
    method.phase = "train"
    method.train_mode()
    images, labels, indices = next(trainer.data.train.batches(16, shuffle=False, drop_last=False, device="cpu"))
    out = method.train_step(images, labels, torch.Generator().manual_seed(0), indices)
    out["loss"].backward()
    assert set(out) >= {"loss_ce", "loss_feat"}
    assert all(p.grad is None for p in method.distill_modules["paraphraser"].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.distill_modules["translator"].parameters())
    assert all(p.grad is None for p in method.teacher.model.parameters())


def test_fsp_init_trains_the_student_features_only(tmp_path: Path) -> None:
    trainer = zoo_trainer(tmp_path, "fsp")
    student = trainer.method.model
    s0 = clone_state(student)
    run_phase(trainer, 0)
    assert changed(s0, student) == {k for k in s0 if not k.startswith("fc.")}
    s1 = clone_state(student)
    run_phase(trainer, 1)
    assert {"fc.weight", "fc.bias"} <= changed(s1, student)
    assert "loss_feat" not in trainer.run.events()[-1]  # feature_weight 0: CE only, as the reference


def test_fsp_refuses_students_whose_channels_differ(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "wide.pt", "resnet8x4")
    with pytest.raises(ValueError, match="fsp: the student's maps have"):
        make_trainer(tmp_path, "fsp", "resnet8", f'[teacher]\ncheckpoint = "{ckpt}"\n')


def test_ft_init_lr_follows_the_reference_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert zoo_trainer(tmp_path / "a", "ft").phases[0].optimizer.param_groups[0]["lr"] == 0.01  # resnet student
    (tmp_path / "b").mkdir()
    assert zoo_trainer(tmp_path / "b", "ft", "init_lr = 0.2\n").phases[0].optimizer.param_groups[0]["lr"] == 0.2
    monkeypatch.setattr(ft_module, "SMALL_LR_STUDENTS", frozenset())  # any other student: the main lr
    (tmp_path / "c").mkdir()
    assert zoo_trainer(tmp_path / "c", "ft").phases[0].optimizer.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------- resume inside the init phase


def new_run(tmp_path: Path, text: str, runs: str) -> RunDir:
    recipe = write_recipe(tmp_path, text, f"{runs}.toml")
    return create_runs(prepare(recipe, None, tmp_path / runs), tmp_path / runs)[0]


def test_ab_interrupted_in_the_init_phase_and_again_in_the_main_one_resumes_bit_identically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = fake_checkpoint(tmp_path / "t.pt", "resnet8x4")
    text = (BASE.format(method="ab", arch="resnet8")
            + f'log_every = 1\n[teacher]\ncheckpoint = "{ckpt}"\n[distill]\ninit_epochs = 2\n')
    reference = new_run(tmp_path, text, "reference")
    assert train(reference.path) == EXIT_FINISHED  # 2 init epochs + 2 main ones, 3 steps each

    stopped = new_run(tmp_path, text, "stopped")
    original = Trainer._step
    stop_after = {4, 10}  # epoch 2 (init), 1st batch; epoch 4 (main), 1st batch

    def stop(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step + 1 in stop_after:
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", stop)
    assert train(stopped.path) == EXIT_INTERRUPTED
    state = load_checkpoint(stopped.checkpoints / "last.pt")
    assert state["progress"]["epoch"] == 1 and state["progress"]["batch_in_epoch"] == 1
    assert state["pre_phases"]["init"]["optimizer"]["state"]  # momentum buffers of the init optimizer
    assert train(stopped.path, resume=True) == EXIT_INTERRUPTED
    state = load_checkpoint(stopped.checkpoints / "last.pt")
    assert state["progress"]["epoch"] == 3 and state["optimizer"]["state"]  # the main optimizer's, too
    monkeypatch.undo()
    assert train(stopped.path, resume=True) == EXIT_FINISHED

    a, b = load_checkpoint(reference.checkpoints / "last.pt"), load_checkpoint(stopped.checkpoints / "last.pt")
    for name in ("model", "distill"):
        assert_equal_states(a["modules"][name], b["modules"][name])
    for x, y in ((a["optimizer"], b["optimizer"]), (a["pre_phases"]["init"]["optimizer"],
                                                     b["pre_phases"]["init"]["optimizer"])):
        assert x["state"].keys() == y["state"].keys()
        for key in x["state"]:
            assert torch.equal(x["state"][key]["momentum_buffer"], y["state"][key]["momentum_buffer"])

    def losses(run: RunDir) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in run.events() if e["split"] == "train" and e.get("kind") == "step"}

    assert losses(reference) == losses(stopped) and len(losses(reference)) == 12
    assert F.mse_loss(a["modules"]["model"]["fc.weight"], b["modules"]["model"]["fc.weight"]) == 0
