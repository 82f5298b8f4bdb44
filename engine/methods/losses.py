"""Distillation losses as pure functions of logits, so tests can check them by hand.

Conventions (HSAKD / RepDistiller): the KL term is KL(p_teacher || p_student) * T^2 with the
teacher's softened distribution as the target, averaged over rows (`batchmean`). Rotated
batches follow `engine.data.augment.rotate4`: row 4b+k is image b turned k times, and the
joint (class, rotation) label is class * 4 + k.

Each loss returns a dict: `loss` (what is optimised) plus its weighted parts under `loss_*`
names, which the trainer averages and logs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from engine.data.augment import joint_labels

NUM_ROTATIONS = 4
Terms = dict[str, Tensor]


def kl_term(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over rows."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def rotation_class_logits(aux_logits: Tensor, num_rot: int = NUM_ROTATIONS) -> Tensor:
    """(N, C*num_rot) joint logits -> (N, C) class logits: column c*num_rot+k summed over k."""
    n, joint = aux_logits.shape
    return aux_logits.view(n, joint // num_rot, num_rot).sum(2)


def supervised_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Terms:
    """Plain cross-entropy on the true labels."""
    return {"loss": F.cross_entropy(logits, labels, label_smoothing=label_smoothing)}


def kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 4.0, alpha: float = 0.9,
            label_smoothing: float = 0.0) -> Terms:
    """Hinton KD: alpha * KL term + (1 - alpha) * CE (RepDistiller's 0.9 / 0.1 at T = 4)."""
    ce = (1 - alpha) * F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    kd = alpha * kl_term(student, teacher, temperature)
    return {"loss": ce + kd, "loss_ce": ce, "loss_kd": kd}


def teacher_target_loss(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 1.0,
                        weight: float = 1.0, label_smoothing: float = 0.0) -> Terms:
    """CE on the true labels + weight * the same CE with the teacher's softmax(t/T) as soft target."""
    ce = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    target = weight * F.cross_entropy(student, F.softmax(teacher / temperature, 1))
    return {"loss": ce + target, "loss_ce": ce, "loss_target": target}


def hsakd_teacher_loss(main: Tensor, aux: list[Tensor], labels: Tensor, label_smoothing: float = 0.0) -> Terms:
    """Sum over branches of CE(aux_i, joint label) + CE(main logits of the un-rotated rows, class).

    `main` and each `aux[i]` hold 4B rows in rotate4 order; `labels` are the B class labels.
    """
    joint = joint_labels(labels, NUM_ROTATIONS)
    terms: Terms = {"loss_main": F.cross_entropy(main[0::NUM_ROTATIONS], labels, label_smoothing=label_smoothing)}
    for i, logits in enumerate(aux, start=1):
        terms[f"loss_aux{i}"] = F.cross_entropy(logits, joint)
    terms["loss"] = sum(terms.values())
    return terms


def hsakd_student_loss(s_main: Tensor, s_aux: list[Tensor], t_main: Tensor, t_aux: list[Tensor], labels: Tensor,
                       temperature: float = 3.0, ce_weight: float = 1.0, aux_kd_weight: float = 1.0,
                       main_kd_weight: float = 1.0, label_smoothing: float = 0.0) -> Terms:
    """HSAKD student: CE(main of un-rotated rows, class) + sum_i KL(aux_i) + KL(main over all 4B rows).

    No CE on the student's branches: they learn only from the teacher's branches.
    """
    if len(s_aux) != len(t_aux):
        raise ValueError(f"student has {len(s_aux)} auxiliary branches, teacher {len(t_aux)}")
    ce = ce_weight * F.cross_entropy(s_main[0::NUM_ROTATIONS], labels, label_smoothing=label_smoothing)
    terms: Terms = {"loss_ce": ce}
    for i, (s, t) in enumerate(zip(s_aux, t_aux, strict=True), start=1):
        terms[f"loss_kd_aux{i}"] = aux_kd_weight * kl_term(s, t, temperature)
    terms["loss_kd_main"] = main_kd_weight * kl_term(s_main, t_main, temperature)
    terms["loss"] = sum(terms.values())
    return terms


def with_deep_supervision(main: Terms, aux: Terms, weight: float) -> Terms:
    """loss = main loss + weight * the same loss on the auxiliary head; the aux part is logged as loss_deep."""
    deep = weight * aux["loss"]
    return {**main, "loss": main["loss"] + deep, "loss_deep": deep}
