"""`rkd`: relational knowledge distillation (Park et al., CVPR 2019, "Relational Knowledge
Distillation"): the student's pooled features feat[-1] should relate to one another as the
teacher's do, by pairwise distance and by the angle each triplet forms.

    distance: smooth_l1(d_s / mean d_s, d_t / mean d_t) over every (i, j) of the batch
    angle:    smooth_l1(cos angle_s(i, j, k), cos angle_t(i, j, k)), angle at i between j and k
    loss = distance_weight * distance + angle_weight * angle

Follows RepDistiller (HobbitLong/RepDistiller, distiller_zoo/RKD.py, `RKDLoss`): plain (not
squared) Euclidean distances from the expanded ||a||^2 + ||b||^2 - 2ab clamped at eps = 1e-12
before the square root, the diagonal set to 0; each side normalised by the mean of its positive
distances; the teacher's distances and angles computed without gradients; `F.smooth_l1_loss`
(threshold 1, mean over the B^2 pairs and B^3 triplets). Same defaults in mdistiller
(mdistiller/engine/cfg.py CFG.RKD, PDIST.SQUARED False, EPSILON 1e-12).
Weights 25 / 50 (`RKDLoss(w_d=25, w_a=50)`); beta 1 (scripts/run_cifar_distill.sh,
`--distill rkd -a 0 -b 1`). Under mixed precision the loss runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features


def pairwise_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances (squared if asked), zero on the diagonal."""
    sq = x.pow(2).sum(1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return dist.masked_fill(eye, 0.0)


def _mean_normalised(dist: Tensor) -> Tensor:
    """dist / the mean of its positive entries (written without boolean indexing: no device sync)."""
    return dist / (dist.sum() / (dist > 0).sum())


def triplet_cosines(x: Tensor) -> Tensor:
    """(B, D) -> (B^3,): cos of the angle at x_i between x_j and x_k, for every (i, j, k)."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [i, j] = unit(x_j - x_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = student.flatten(1), teacher.detach().flatten(1)
    with torch.no_grad():
        target = _mean_normalised(pairwise_distances(t))
    return F.smooth_l1_loss(_mean_normalised(pairwise_distances(s)), target)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = student.flatten(1), teacher.detach().flatten(1)
    with torch.no_grad():
        target = triplet_cosines(t)
    return F.smooth_l1_loss(triplet_cosines(s), target)


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    return (distance_weight * rkd_distance_loss(student, teacher)
            + angle_weight * rkd_angle_loss(student, teacher))


class RKD(FeatureDistill):
    default_feature_weight = 1.0
    drop_last = True  # a one-row last batch has no pair to relate (the mean distance would be NaN)

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        cfg = self.recipe.distill.rkd
        with torch.autocast(self.device.type, enabled=False):  # distances and angles in float32
            return rkd_loss(student.as_list()[-1].float(), teacher.as_list()[-1].float(),
                            cfg.distance_weight, cfg.angle_weight)
