"""`vid`: variational information distillation (Ahn et al., CVPR 2019, "Variational Information
Distillation for Knowledge Transfer").

For each stage pair feat[1:-1] a regressor predicts the mean of a Gaussian over the teacher's
map from the student's, with one learned variance per teacher channel; the loss is the negative
log-likelihood of the teacher's map (without the constant log sqrt(2 pi)), averaged over every
element, summed over the stage pairs:

    0.5 * ((mu(s) - t)^2 / var + log var),    var = softplus(log_scale) + eps

Follows RepDistiller (HobbitLong/RepDistiller, distiller_zoo/VID.py, `VIDLoss`, "code from
author", ssahn0215/variational-information-distillation; built in train_student.py as
`VIDLoss(s_C, t_C, t_C)`): the regressor is conv1x1(s_C -> t_C), ReLU, conv1x1, ReLU, conv1x1,
all without bias and with PyTorch's default init, middle width = the teacher's channels; the
larger map is average-pooled to the smaller one's size first; log_scale starts at
softplus^-1(init_pred_var - eps) so the variance starts at init_pred_var; regressors and
log_scales all train. `F.softplus` stands for the reference's log(1 + exp(x)) (the same
function, without overflow). Defaults init_pred_var 5.0, eps 1e-5 (VIDLoss's; also mdistiller
CFG.VID); beta 1 (scripts/run_cifar_distill.sh, `--distill vid -a 0 -b 1`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.methods.zoo.base import FeatureDistill, stage_pairs
from engine.methods.zoo.nst import pool_to_smaller
from engine.models.base import Features


def inverse_softplus(y: float) -> float:
    """x with log(1 + exp(x)) = y."""
    return math.log(math.expm1(y))


def vid_nll(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean over every element of 0.5 * ((mu - t)^2 / var + log var), var per channel."""
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean - target.detach()).pow(2) / var + var.log())).mean()


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    """One stage pair: the mean regressor and the per-channel log-scale of the variance."""

    def __init__(self, s_channels: int, t_channels: int, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(_conv1x1(s_channels, t_channels), nn.ReLU(),
                                       _conv1x1(t_channels, t_channels), nn.ReLU(),
                                       _conv1x1(t_channels, t_channels))
        self.log_scale = nn.Parameter(torch.full((t_channels,), inverse_softplus(init_pred_var - eps)))
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        student, teacher = pool_to_smaller(student, teacher)
        return vid_nll(self.regressor(student), teacher, self.log_scale, self.eps)


class VID(FeatureDistill):
    default_feature_weight = 1.0

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        cfg = self.recipe.distill.vid
        return nn.ModuleDict({f"stage{i}": VIDRegressor(s.shape[1], t.shape[1], cfg.init_pred_var, cfg.eps)
                              for i, (s, t) in enumerate(stage_pairs(student, teacher, "vid"), 1)})

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        pairs = stage_pairs(student, teacher, "vid")
        return sum(module(s, t) for module, (s, t) in zip(self.distill_modules.values(), pairs, strict=True))
