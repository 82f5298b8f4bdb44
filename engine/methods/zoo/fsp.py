"""`fsp`: flow of solution procedure (Yim et al., CVPR 2017, "A Gift from Knowledge Distillation:
Fast Optimization, Network Minimization and Transfer Learning").

For each pair of consecutive maps (bottom, top) of feat[:-1] = [f0, f1, ..., fk] (the larger
pooled to the smaller's size), the FSP matrix is the spatial mean of channel products,

    G[b, j, i] = mean_{h,w} top[b, j, h, w] * bottom[b, i, h, w]      (B, C_top, C_bottom)

and the loss is the sum over pairs of the mean squared difference of student and teacher
matrices (so student and teacher must agree on every map's channel count).

Schedule, as RepDistiller runs `--distill fsp`: an initialisation phase of init_epochs (30)
trains the student's feature modules (everything but the classifier) on the FSP loss alone, at
the main lr; the main phase then trains CE (+ KD) only, because helper/loops.py sets
loss_kd = 0 for fsp (the sample script's `-b 50` multiplies that zero): feature_weight
defaults to 0, and a feature_weight > 0 adds the FSP loss to the main phase too.

Sources (HobbitLong/RepDistiller): distiller_zoo/FSP.py (matrices, pooling, loss, channel check),
train_student.py and helper/pretrain.py (init phase, what it trains), helper/loops.py.
"""

from __future__ import annotations

from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """(B, C1, H, W), (B, C2, H', W') -> (B, C2, C1): mean over positions of top_j * bottom_i."""
    hb, ht = bottom.shape[2], top.shape[2]
    if hb > ht:
        bottom = F.adaptive_avg_pool2d(bottom, (ht, ht))
    elif hb < ht:
        top = F.adaptive_avg_pool2d(top, (hb, hb))
    return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / bottom[0, 0].numel()


def fsp_matrices(maps: list[Tensor]) -> list[Tensor]:
    """FSP matrices of each consecutive pair (maps[i], maps[i + 1])."""
    return [fsp_matrix(bottom, top) for bottom, top in pairwise(maps)]


def fsp_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Sum over pairs of mean (G_s - G_t)^2."""
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(student), fsp_matrices(teacher), strict=True))


class FSP(FeatureDistill):
    default_feature_weight = 0.0  # loss_kd = 0 in the reference's main phase
    default_init_epochs = 30

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        s, t = [f.shape[1] for f in student.as_list()[:-1]], [f.shape[1] for f in teacher.as_list()[:-1]]
        if s != t:
            raise ValueError(f"fsp: the student's maps have {s} channels and the teacher's {t}; FSP matrices "
                             "compare only equal channel counts (pick a pair of the same family and width)")
        return nn.ModuleDict()

    def init_parameters(self) -> list[nn.Parameter]:
        return self.student_feature_parameters()

    def init_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        return fsp_loss(student.as_list()[:-1], teacher.as_list()[:-1])

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        return self.init_loss(student, teacher, labels, indices)
