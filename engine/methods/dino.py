"""DINO (Caron et al. 2021, arXiv:2104.14294): self-distillation onto a momentum teacher.

Student: backbone -> DINO head (3-layer MLP with GELU, no batch norm -> L2 norm -> prototypes, a
weight-normalised Linear without bias whose norms stay 1). Teacher: an EMA of backbone + head
(engine/methods/ssl_base.py), momentum on a cosine from base_tau to final_tau. The teacher sees the
two global views; its outputs are centred (c, an EMA of the batch mean with momentum 0.9, averaged
over every rank) and sharpened (temperature warm-up from warmup_teacher_temp to teacher_temp over
warmup_teacher_temp_epochs, then constant); the loss is the mean cross-entropy over (teacher view,
student view) pairs of different views, the student at temperature 0.1. `ssl.local_crops` adds
multi-crop: extra small views the student alone sees. The prototypes get no gradient in the first
freeze_last_layer_epochs epochs. Logged: `teacher_temp`, `tau` and `target_entropy` (the teacher
targets' entropy over ln K: near 1 is the uniform collapse, near 0 one prototype). The centre is a
buffer of a saved module: resume restores it.

Defaults (engine/recipe_ssl.py DINOSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/dino.yaml: head 2048 -> 256, 4096 prototypes, tau 0.9995 -> 1.0, LARS lr 0.3
(eta 0.02, clipped, biases and norms excluded), weight decay 1e-6, probe lr 0.1, batch 256, 1000
epochs, asymmetric views (preset "dino"); and solo-learn solo/methods/dino.py's defaults: student
0.1, teacher 0.07 (warm-up from 0.04 over 0 epochs), centre momentum 0.9 (solo/losses/dino.py), last
layer frozen for 1 epoch, no batch norm in the head, truncated-normal (std 0.02) init of its MLP.
Local crops: facebookresearch/dino main_dino.py (scale 0.05-0.4, blur p 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle
from engine.methods.ssl_base import SSLMethod, frozen_copy, full_precision, mlp
from engine.methods.ssl_zoo_losses import dino_loss, target_entropy, teacher_temperature, update_center_
from engine.recipe import Recipe


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> cosine to the prototypes (rows of `prototypes`, normalised in forward:
    weight norm with the gain fixed at 1). `frozen_prototypes` stops their gradient."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.mlp = mlp([in_dim, hidden_dim, hidden_dim, bottleneck_dim], batch_norm=False, activation=nn.GELU)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # nn.Linear's init of the direction
        self.frozen_prototypes = False

    def forward(self, feats: Tensor) -> Tensor:
        x = F.normalize(self.mlp(feats), dim=-1)
        prototypes = self.prototypes.detach() if self.frozen_prototypes else self.prototypes
        return F.linear(x, F.normalize(prototypes, dim=1))


class Center(nn.Module):
    """DINO's running centre of the teacher outputs, [1, prototypes]."""

    center: Tensor

    def __init__(self, num_prototypes: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, num_prototypes))


class DINO(SSLMethod):
    name, preset = "dino", "dino"

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        self.target = frozen_copy(self.model).to(device)
        self.center = Center(self.cfg.num_prototypes).to(device)

    def build_projector(self, feature_dim: int) -> nn.Module:
        c = self.cfg
        return DINOHead(feature_dim, c.proj_hidden_dim, c.proj_dim, c.num_prototypes)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target, "center": self.center}

    def train_mode(self) -> None:
        super().train_mode()
        self.model.projector.frozen_prototypes = self.epoch <= self.cfg.freeze_last_layer_epochs

    def teacher_temp(self) -> float:
        c = self.cfg
        return teacher_temperature(self.epoch - 1, c.warmup_teacher_temp, c.teacher_temp,
                                   c.warmup_teacher_temp_epochs)

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        c = self.cfg
        student = [self.model.projector(f).float() for f in feats]
        with torch.no_grad():
            teacher = [self.target.projector(self.target(v)).float() for v in views[:self.global_views]]
        temperature = self.teacher_temp()
        with full_precision(self.device):
            loss = dino_loss(student, teacher, self.center.center, c.student_temp, temperature)
        out = {"loss": loss}
        if training:
            out["target_entropy"] = target_entropy(teacher, self.center.center, temperature)
            update_center_(self.center.center, teacher, c.center_momentum)
            out["tau"] = torch.tensor(self.momentum(self.step + 1))
            out["teacher_temp"] = torch.tensor(temperature)
        return out

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.update_target(self.target, step)
