"""`at`: attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

Each stage map f (B, C, H, W) becomes an attention map: the channel mean of |f|^p, flattened and
L2-normalised per sample (over positions); the loss is the mean squared difference of student and
teacher maps, summed over the stage pairs feat[1:-1]. A larger map is average-pooled to the
smaller one's size first, so pairs with different resolutions work. The teacher side is a constant.

RepDistiller writes f.pow(p): the same for its p = 2 and for post-ReLU maps; |f| (the paper's
definition) keeps maps with negative entries (e.g. linear bottlenecks) defined for other p.

Defaults: p = 2 (RepDistiller's `Attention(p=2)`, distiller_zoo/AT.py); beta 1000 (RepDistiller's
scripts/run_cifar_distill.sh, `--distill attention -a 0 -b 1000`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill, stage_pairs
from engine.models.base import Features


def attention_map(fmap: Tensor, p: float = 2.0) -> Tensor:
    """(B, C, H, W) -> (B, H*W): normalize(mean_c |f|^p), unit L2 norm per row."""
    return F.normalize(fmap.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Mean over batch and positions of (a_s - a_t)^2, after pooling the larger map to the smaller."""
    teacher = teacher.detach()
    hs, ht = student.shape[2], teacher.shape[2]
    if hs > ht:
        student = F.adaptive_avg_pool2d(student, (ht, ht))
    elif hs < ht:
        teacher = F.adaptive_avg_pool2d(teacher, (hs, hs))
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class AT(FeatureDistill):
    default_feature_weight = 1000.0

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        p = self.recipe.distill.at.p
        return sum(at_loss(s, t, p) for s, t in stage_pairs(student, teacher, "at"))
