"""`sp`: similarity-preserving distillation (Tung & Mori, ICCV 2019, "Similarity-Preserving
Knowledge Distillation").

The student learns which images of the batch the teacher finds alike, whatever the widths of
the two networks: each sample's last stage map feat[-2] is flattened, the (B, B) Gram matrix
G = F F^T is L2-normalised row by row, and the loss is ||G_t - G_s||_F^2 / B^2.

Follows RepDistiller (HobbitLong/RepDistiller, distiller_zoo/SP.py, `Similarity`, "verified by
original author"): row-wise `F.normalize` of G (its commented-out alternative, G / ||G||_F, is
not what it runs), squared differences summed and divided by B^2, on feat[-2]
(helper/loops.py). The Gram matrix is symmetric, so normalising rows or columns gives the same
value, and the loss is symmetric in student and teacher; only the student receives gradients.
beta 3000: scripts/run_cifar_distill.sh (`--distill similarity -a 0 -b 3000`), also mdistiller's
CFG.SP.LOSS.FEAT_WEIGHT (mdistiller/engine/cfg.py). Under mixed precision the loss runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features


def similarity_matrix(fmap: Tensor) -> Tensor:
    """(B, ...) -> (B, B): the batch's Gram matrix with every row scaled to unit L2 norm."""
    flat = fmap.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """sum((G_t - G_s)^2) / B^2; the teacher side is a constant."""
    batch = student.shape[0]
    diff = similarity_matrix(teacher.detach()) - similarity_matrix(student)
    return diff.pow(2).sum() / (batch * batch)


class SP(FeatureDistill):
    default_feature_weight = 3000.0

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):  # Gram matrices in float32
            return sp_loss(student.as_list()[-2].float(), teacher.as_list()[-2].float())
