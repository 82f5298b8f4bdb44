"""`cc`: correlation congruence (Peng et al., ICCV 2019, "Correlation Congruence for Knowledge
Distillation"), as RepDistiller runs it.

The pooled features feat[-1] of student and teacher each pass through their own trainable
linear embedding (RepDistiller's `LinearEmbed`: Linear(dim, feat_dim), no normalisation; both
embeddings train, the teacher's included), and with delta = |e_s - e_t| per sample the loss is

    mean over i of  sum_d delta[i, d] * delta[i + 1, d]        (consecutive rows of the batch)

This is the reference's formula (HobbitLong/RepDistiller, distiller_zoo/CC.py, `Correlation`,
"code emailed to me by the original author"), not the paper's: the paper compares (B, B)
correlation matrices of a Gaussian RBF kernel approximated by a Taylor expansion. Because the
teacher's embedding trains too, the loss can also shrink by pulling both embeddings together;
that is the reference's behaviour and is kept. Only the student and the two embeddings receive
gradients, never the teacher's features.

Defaults: feat_dim 128 (train_student.py `--feat_dim`); beta 0.02 (scripts/run_cifar_distill.sh,
`--distill correlation -a 0 -b 0.02`).
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features


def cc_loss(embed_s: Tensor, embed_t: Tensor) -> Tensor:
    """(B, D) embeddings -> mean_i sum_d |s - t|[i, d] * |s - t|[i + 1, d] (needs B >= 2)."""
    delta = (embed_s - embed_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


class CC(FeatureDistill):
    default_feature_weight = 0.02
    drop_last = True  # a one-row last batch has no consecutive pair (the mean would be NaN)

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        dim = self.recipe.distill.cc.feat_dim
        return nn.ModuleDict({"embed_s": nn.Linear(student.pooled.shape[1], dim),
                              "embed_t": nn.Linear(teacher.pooled.shape[1], dim)})

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        embed_s = self.distill_modules["embed_s"](student.as_list()[-1])
        embed_t = self.distill_modules["embed_t"](teacher.as_list()[-1])
        return cc_loss(embed_s, embed_t)
