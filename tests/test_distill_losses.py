"""Distillation losses, rotation expansion and joint labels against hand-computed values.

Expected values are written out with `math` and explicit loops (sum of p * log(p / q), -log of a
softmax entry), never with the torch calls the implementation uses.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.data import augment as aug
from engine.methods import losses


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kl_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """mean over rows of sum_j p_t log(p_t / p_s), times T^2."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p, q = softmax(t_row, t), softmax(s_row, t)
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
    return total / len(student) * t * t


def ce_by_hand(logits: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(softmax(row)[y]) for row, y in zip(logits, labels, strict=True)) / len(labels)


def test_kd_loss_matches_a_worked_example() -> None:
    # student uniform over 2 classes; teacher logits 4*ln3 so that at T=4 p_t = (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, 4 * math.log(3)]])
    out = losses.kd_loss(student, teacher, torch.tensor([0]), temperature=4.0, alpha=0.9)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
    assert out["loss_kd"].item() == pytest.approx(0.9 * 16 * kl, rel=1e-6)
    assert out["loss_ce"].item() == pytest.approx(0.1 * math.log(2), rel=1e-6)
    assert out["loss"].item() == pytest.approx(1.953, abs=1e-3)  # 1.88369 + 0.06931


def test_kd_loss_defaults_and_direction_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    y = torch.tensor([1, 4, 0])
    out = losses.kd_loss(s, t, y)  # T = 4, alpha = 0.9
    expected = 0.9 * kl_by_hand(s.tolist(), t.tolist(), 4.0) + 0.1 * ce_by_hand(s.tolist(), y.tolist())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # the teacher is the target: swapping the roles gives a different number
    assert losses.kl_term(t, s, 4.0).item() != pytest.approx(losses.kl_term(s, t, 4.0).item(), rel=1e-3)
    assert losses.kl_term(s, t, 4.0).item() == pytest.approx(kl_by_hand(s.tolist(), t.tolist(), 4.0), rel=1e-5)


def test_teacher_target_loss_is_unweighted_sum_by_default() -> None:
    # student uniform: CE(true) = ln 2; soft CE against p_t = (1/4, 3/4) = -(1/4 + 3/4) ln(1/2) = ln 2
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3)]])
    out = losses.teacher_target_loss(student, teacher, torch.tensor([1]))
    assert out["loss"].item() == pytest.approx(2 * math.log(2), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    y = torch.tensor([2, 0])
    out = losses.teacher_target_loss(s, t, y, temperature=2.0, weight=0.5)
    soft = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist(), strict=True):
        p, q = softmax(t_row, 2.0), softmax(s_row)
        soft -= sum(pj * math.log(qj) for pj, qj in zip(p, q, strict=True))
    assert out["loss"].item() == pytest.approx(ce_by_hand(s.tolist(), y.tolist()) + 0.5 * soft / 2, rel=1e-5)


def test_deep_supervision_adds_weighted_aux_loss() -> None:
    main = {"loss": torch.tensor(1.0), "loss_ce": torch.tensor(1.0)}
    out = losses.with_deep_supervision(main, {"loss": torch.tensor(2.0)}, 0.7)
    assert out["loss"].item() == pytest.approx(2.4)
    assert out["loss_deep"].item() == pytest.approx(1.4) and out["loss_ce"].item() == 1.0


def test_hsakd_teacher_loss_by_hand() -> None:
    g = torch.Generator().manual_seed(2)
    b, c = 2, 3
    labels = torch.tensor([2, 0])
    main = torch.randn(4 * b, c, generator=g)
    aux = [torch.randn(4 * b, 4 * c, generator=g) for _ in range(3)]
    out = losses.hsakd_teacher_loss(main, aux, labels)
    joint = [y * 4 + k for y in labels.tolist() for k in range(4)]  # rows 4b+k
    unrotated = [main[4 * i].tolist() for i in range(b)]
    expected = ce_by_hand(unrotated, labels.tolist()) + sum(ce_by_hand(a.tolist(), joint) for a in aux)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert set(out) == {"loss", "loss_main", "loss_aux1", "loss_aux2", "loss_aux3"}


def test_hsakd_student_loss_by_hand() -> None:
    g = torch.Generator().manual_seed(3)
    b, c, t = 2, 3, 3.0
    labels = torch.tensor([1, 2])
    s_main, t_main = torch.randn(4 * b, c, generator=g), torch.randn(4 * b, c, generator=g)
    s_aux = [torch.randn(4 * b, 4 * c, generator=g) for _ in range(3)]
    t_aux = [torch.randn(4 * b, 4 * c, generator=g) for _ in range(3)]
    out = losses.hsakd_student_loss(s_main, s_aux, t_main, t_aux, labels, temperature=t)
    ce = ce_by_hand([s_main[0].tolist(), s_main[4].tolist()], labels.tolist())
    kl_aux = sum(kl_by_hand(s.tolist(), tt.tolist(), t) for s, tt in zip(s_aux, t_aux, strict=True))
    kl_main = kl_by_hand(s_main.tolist(), t_main.tolist(), t)  # over all 4B rows
    assert out["loss"].item() == pytest.approx(ce + kl_aux + kl_main, rel=1e-5)
    weighted = losses.hsakd_student_loss(s_main, s_aux, t_main, t_aux, labels, temperature=t, ce_weight=0.5,
                                         aux_kd_weight=2.0, main_kd_weight=0.0)
    assert weighted["loss"].item() == pytest.approx(0.5 * ce + 2.0 * kl_aux, rel=1e-5)
    with pytest.raises(ValueError, match="branches"):
        losses.hsakd_student_loss(s_main, s_aux[:2], t_main, t_aux, labels)


def test_rotate4_rows_and_joint_labels() -> None:
    # one 1-channel 2x2 image [[a, b], [c, d]] per sample; rot90 (counter-clockwise) by hand
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 6.0], [7.0, 8.0]]]])
    rotated = aug.rotate4(x)
    assert rotated.shape == (8, 1, 2, 2)
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    expected = [[[a, b], [c, d]], [[b, d], [a, c]], [[d, c], [b, a]], [[c, a], [d, b]]]
    for k in range(4):
        assert rotated[k, 0].tolist() == expected[k]
    assert rotated[4, 0].tolist() == [[5.0, 6.0], [7.0, 8.0]] and rotated[5, 0].tolist() == [[6.0, 8.0], [5.0, 7.0]]
    assert aug.joint_labels(torch.tensor([2, 0])).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]


def test_rotation_class_logits_sum_each_class_over_rotations() -> None:
    # 2 classes x 4 rotations: column c*4 + k
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 9.0, 1.0, 1.0, 1.0, 1.0]])
    assert losses.rotation_class_logits(logits).tolist() == [[10.0, 100.0], [9.0, 4.0]]
