"""`dkd`: decoupled knowledge distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge
Distillation"). The classical KL term is split in two and the parts are weighted separately:

    TCKD = KL(b_t || b_s) * T^2,  b = (p_target, 1 - p_target): the binary target-vs-rest split
    NCKD = KL(q_t || q_s) * T^2,  q = softmax over the non-target classes only
    loss = min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)

both KLs summed over classes and divided by the batch size, with p = softmax(z / T). The DKD
term is this method's feature loss (feature_weight 1 leaves it as mdistiller has it) and takes
the place of the KL term, which stays off (kd_weight 0); the CE weight is mdistiller's 1.0.

Follows mdistiller (megvii-research/mdistiller, mdistiller/distillers/DKD.py, `dkd_loss`), with
two equivalent but numerically safer forms: the binary log-probabilities come from log_softmax
and logsumexp instead of log(p) of summed probabilities, and the non-target softmax masks the
target column out (-inf) instead of subtracting 1000 from it (identical unless logits / T differ
by ~1000).
The warm-up factor uses the 1-based epoch within the phase (`self.epoch`), as mdistiller passes
its 1-based epoch. Defaults from mdistiller/engine/cfg.py CFG.DKD: CE_WEIGHT 1.0, ALPHA 1.0,
BETA 8.0, T 4.0, WARMUP 20.

mdistiller's CIFAR-100 configs (configs/cifar100/dkd/*.yaml; all alpha 1, T 4, warm-up 20)
set beta per teacher -> student pair; use these in recipes:

    teacher      student       beta    config
    resnet32x4   resnet8x4     8.0     res32x4_res8x4.yaml (default)
    resnet32x4   ShuffleV1     8.0     res32x4_shuv1.yaml (default)
    resnet32x4   ShuffleV2     8.0     res32x4_shuv2.yaml (default)
    ResNet50     MobileNetV2   8.0     res50_mv2.yaml (default)
    wrn_40_2     ShuffleV1     8.0     wrn40_2_shuv1.yaml (default)
    resnet56     resnet20      2.0     res56_res20.yaml
    resnet110    resnet32      2.0     res110_res32.yaml
    vgg13        vgg8          6.0     vgg13_vgg8.yaml
    vgg13        MobileNetV2   6.0     vgg13_mv2.yaml
    wrn_40_2     wrn_16_2      6.0     wrn40_2_wrn_16_2.yaml
    wrn_40_2     wrn_40_1      6.0     wrn40_2_wrn_40_1.yaml
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features


def _kl(log_target: Tensor, log_input: Tensor, skip: Tensor | None = None) -> Tensor:
    """sum of p_target * (log p_target - log p_input) from log-probabilities, leaving out `skip`."""
    terms = log_target.exp() * (log_target - log_input)
    return (terms if skip is None else terms.masked_fill(skip, 0.0)).sum()


def _split(logits: Tensor, gt: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(B, C) -> binary log-probs (B, 2) [target, rest], and log-probs over the non-target classes
    (B, C) with -inf in the target column (masks rather than boolean indexing: no device sync)."""
    z = logits / temperature
    log_p = torch.log_softmax(z, 1)
    log_gt = log_p.masked_fill(~gt, float("-inf")).logsumexp(1)
    log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(1)
    return torch.stack([log_gt, log_rest], 1), torch.log_softmax(z.masked_fill(gt, float("-inf")), 1)


def dkd_parts(student: Tensor, teacher: Tensor, target: Tensor, temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each KL(teacher || student) * T^2 summed over classes, averaged over rows."""
    gt = torch.zeros_like(student, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)
    b_s, q_s = _split(student, gt, temperature)
    b_t, q_t = _split(teacher.detach(), gt, temperature)
    scale = temperature**2 / target.shape[0]
    return _kl(b_t, b_s) * scale, _kl(q_t, q_s, skip=gt) * scale


def dkd_loss(student: Tensor, teacher: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> Tensor:
    tckd, nckd = dkd_parts(student, teacher, target, temperature)
    return alpha * tckd + beta * nckd


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup_epochs, 1) for the 1-based epoch; 1 without warm-up."""
    return min(epoch / warmup_epochs, 1.0) if warmup_epochs else 1.0


class DKD(FeatureDistill):
    default_feature_weight = 1.0

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        cfg = self.recipe.distill.dkd
        return warmup_factor(self.epoch, cfg.warmup_epochs) * dkd_loss(
            student.logits, teacher.logits, labels, cfg.alpha, cfg.beta, self.temperature)
