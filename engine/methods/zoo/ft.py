"""`ft`: factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network: Network
Compression via Factor Transfer").

A paraphraser (conv encoder + transposed-conv decoder, LeakyReLU 0.1, no BN) on the teacher's
last map feat[-2] compresses it to rate * C_t channels, the "factor". It is trained first, in
an initialisation phase of init_epochs (30), to reconstruct the teacher map (MSE, the teacher
map the target); nothing else moves then (the student stays in eval mode, as the reference's
`model_s.eval()`). In the main phase the paraphraser is frozen (eval mode, out of the
optimizer, its factor computed without gradients) and a translator (the same encoder, with BN)
on the student's feat[-2] learns to produce the same factor:

    factor(f) = normalize(mean_c f^p1, flattened)  (unit L2 norm per sample)
    loss      = mean |factor(translator(s)) - factor(paraphraser(t))|^p2   (p1 2, p2 1)

the larger map average-pooled to the smaller's size first.

Defaults (HobbitLong/RepDistiller): rate 0.5, paraphraser without BN and translator with BN
(models/util.py, Paraphraser(k=0.5, use_bn=False), Translator(k=0.5, use_bn=True));
FactorTransfer(p1=2, p2=1) (distiller_zoo/FT.py); beta 200 (scripts/run_cifar_distill.sh,
`--distill factor -a 0 -b 200`); init_epochs 30 and the init-phase lr: 0.01 for CIFAR ResNet and
WRN students, the main lr otherwise (helper/pretrain.py; distill.init_lr overrides it);
init loss nn.MSELoss(rec, f_t) (train_student.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.methods.base import Phase, StepOutput
from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features

# helper/pretrain.py: students whose init phase runs at lr 0.01 in 'factor' mode
SMALL_LR_STUDENTS = frozenset({"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                               "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"})
SMALL_STUDENT_INIT_LR = 0.01


def _block(conv: nn.Module, channels: int, bn: bool) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(channels)] if bn else []), nn.LeakyReLU(0.1)]


def _encoder(c_in: int, c_out: int, bn: bool) -> nn.Sequential:
    """Three 3x3 convs, c_in -> c_in -> c_out -> c_out, each (BN +) LeakyReLU(0.1)."""
    return nn.Sequential(*_block(nn.Conv2d(c_in, c_in, 3, 1, 1), c_in, bn),
                         *_block(nn.Conv2d(c_in, c_out, 3, 1, 1), c_out, bn),
                         *_block(nn.Conv2d(c_out, c_out, 3, 1, 1), c_out, bn))


class Paraphraser(nn.Module):
    """Teacher map (C) -> factor (rate * C) -> reconstruction (C)."""

    def __init__(self, channels: int, rate: float = 0.5, bn: bool = False) -> None:
        super().__init__()
        k = int(channels * rate)
        self.encoder = _encoder(channels, k, bn)
        self.decoder = nn.Sequential(*_block(nn.ConvTranspose2d(k, k, 3, 1, 1), k, bn),
                                     *_block(nn.ConvTranspose2d(k, channels, 3, 1, 1), channels, bn),
                                     *_block(nn.ConvTranspose2d(channels, channels, 3, 1, 1), channels, bn))

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction (what the initialisation phase trains); `encoder(x)` is the factor."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Student map (C_s) -> a factor of the teacher's size (rate * C_t)."""

    def __init__(self, s_channels: int, t_channels: int, rate: float = 0.5, bn: bool = True) -> None:
        super().__init__()
        self.encoder = _encoder(s_channels, int(t_channels * rate), bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def factor(fmap: Tensor, p1: float = 2.0) -> Tensor:
    """(B, C, H, W) -> (B, H*W): normalize(mean_c f^p1), unit L2 norm per row."""
    return F.normalize(fmap.pow(p1).mean(1).flatten(1), dim=1)


def factor_transfer_loss(student: Tensor, teacher: Tensor, p1: float = 2.0, p2: int = 1) -> Tensor:
    """Mean over batch and positions of |factor_s - factor_t|^p2, the larger map pooled to the smaller."""
    hs, ht = student.shape[2], teacher.shape[2]
    if hs > ht:
        student = F.adaptive_avg_pool2d(student, (ht, ht))
    elif hs < ht:
        teacher = F.adaptive_avg_pool2d(teacher, (hs, hs))
    return (factor(student, p1) - factor(teacher, p1)).abs().pow(p2).mean()


class FT(FeatureDistill):
    default_feature_weight = 200.0
    default_init_epochs = 30

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        rate = self.recipe.distill.ft.rate
        s_c, t_c = student.as_list()[-2].shape[1], teacher.as_list()[-2].shape[1]
        if int(t_c * rate) < 1:
            raise ValueError(f"distill.ft.rate: {rate} x {t_c} teacher channels leaves no factor channel")
        return nn.ModuleDict({"paraphraser": Paraphraser(t_c, rate, bn=False),
                              "translator": Translator(s_c, t_c, rate, bn=True)})

    @property
    def paraphraser(self) -> Paraphraser:
        return self.distill_modules["paraphraser"]

    @property
    def translator(self) -> Translator:
        return self.distill_modules["translator"]

    def pre_phases(self) -> list[Phase]:
        if not self.init_epochs:
            return []
        lr = self.recipe.distill.init_lr
        if lr is None and self.recipe.model.arch in SMALL_LR_STUDENTS:
            lr = SMALL_STUDENT_INIT_LR
        return [Phase("init", self.init_epochs, self.init_parameters(), lr)]

    def init_parameters(self) -> list[nn.Parameter]:
        return list(self.paraphraser.parameters())

    def trainable_module_parameters(self) -> list[nn.Parameter]:
        return list(self.translator.parameters())  # the paraphraser is frozen after the init phase

    def train_mode(self) -> None:
        init = self.phase == "init"
        self.model.train(not init)
        self.translator.train(not init)
        self.paraphraser.train(init)

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        if self.phase != "init":
            return super().train_step(images, labels, generator, indices)
        x = self.augment(images, generator)
        teacher = self.teacher.features(x)
        with torch.no_grad():  # the student only reports its (unchanging) train accuracy here
            student = self.model(x, features=True)
        loss = self.init_loss(student, teacher, labels, indices)
        return {"loss": loss, "loss_init": loss.detach(), "logits": student.logits, "labels": labels}

    def init_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        target = teacher.as_list()[-2]
        return F.mse_loss(self.paraphraser(target), target)

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        cfg = self.recipe.distill.ft
        with torch.no_grad():
            target = self.paraphraser.encoder(teacher.as_list()[-2])
        return factor_transfer_loss(self.translator(student.as_list()[-2]), target, cfg.p1, cfg.p2)
