"""`nst`: neuron selectivity transfer (Huang & Wang, 2017, "Like What You Like: Knowledge
Distill via Neuron Selectivity Transfer").

Each channel of a stage map is one neuron's selectivity pattern over positions; the loss is the
squared maximum mean discrepancy between the student's and the teacher's channel sets under the
polynomial kernel k(a, b) = (a . b)^2, summed over the stage pairs feat[1:-1]:

    MMD^2 = mean k(t, t') + mean k(s, s') - 2 mean k(s, t)

Follows RepDistiller (HobbitLong/RepDistiller, distiller_zoo/NST.py, `NSTLoss`): the larger map
average-pooled to the smaller one's size; each channel flattened and L2-normalised over its
positions (dim 2 of (B, C, H*W), not over channels); the squared (degree-2, c = 0) kernel; every
term a mean over batch x channels x channels (student and teacher may have different channel
counts); the teacher-teacher term detached (`full_loss = True`). beta 50:
scripts/run_cifar_distill.sh (`--distill nst -a 0 -b 50`). Under mixed precision the loss runs in
float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill, stage_pairs
from engine.models.base import Features


def pool_to_smaller(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever map is larger to the other's spatial size (RepDistiller's AT/NST/VID)."""
    hs, ht = student.shape[2], teacher.shape[2]
    if hs > ht:
        student = F.adaptive_avg_pool2d(student, teacher.shape[2:])
    elif hs < ht:
        teacher = F.adaptive_avg_pool2d(teacher, student.shape[2:])
    return student, teacher


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over (batch, channel of a, channel of b) of (a_c . b_c')^2."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = pool_to_smaller(student, teacher.detach())
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)
    return poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


class NST(FeatureDistill):
    default_feature_weight = 50.0

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):  # kernels in float32
            return sum(nst_loss(s.float(), t.float()) for s, t in stage_pairs(student, teacher, "nst"))
