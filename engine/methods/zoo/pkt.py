"""`pkt`: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep
Representations with Probabilistic Knowledge Transfer").

The pooled features feat[-1] of each network become a conditional distribution over the batch:
cosine similarities between samples, shifted to [0, 1] by (cos + 1) / 2 and divided by their row
sums, so row i is p(j | i). The loss is the KL divergence of the student's rows from the
teacher's, KL(p_teacher || p_student), averaged over the B^2 entries.

Follows RepDistiller (HobbitLong/RepDistiller, distiller_zoo/PKT.py, `cosine_similarity_loss`,
"code from author", passalis/probabilistic_kt): each sample's vector divided by (its L2 norm +
eps), NaN entries set to 0, eps = 1e-7 also inside log((t + eps) / (s + eps)), the diagonal
(self-similarity) kept, and `torch.mean` over all B^2 entries rather than a sum per row.
beta 30000: scripts/run_cifar_distill.sh (`--distill pkt -a 0 -b 30000`). Under mixed precision
the loss is computed in float32 (in bf16 the near-uniform probabilities lose most of their KL).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features

EPS = 1e-7


def conditional_similarities(x: Tensor, eps: float = EPS) -> Tensor:
    """(B, D) -> (B, B): row i is p(j | i) from the cosine similarities, shifted to [0, 1]."""
    x = x.flatten(1)
    x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = EPS) -> Tensor:
    """mean over (i, j) of p_t log((p_t + eps) / (p_s + eps)): the rows' KL(p_t || p_s) summed, / B^2."""
    s, t = conditional_similarities(student, eps), conditional_similarities(teacher.detach(), eps)
    return (t * torch.log((t + eps) / (s + eps))).mean()


class PKT(FeatureDistill):
    default_feature_weight = 30000.0

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):  # bf16 cosines are too coarse for beta 3e4
            return pkt_loss(student.as_list()[-1].float(), teacher.as_list()[-1].float())
