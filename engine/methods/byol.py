"""BYOL (Grill et al. 2020, arXiv:2006.07733): an online network predicts a slow target's projection.

Online: backbone -> projector (Linear-BN-ReLU-Linear) -> predictor (same shape); target: an EMA of
backbone + projector (engine/methods/ssl_base.py), whose momentum rises on a cosine from base_tau to
final_tau over all optimizer steps. Loss: the symmetric normalised regression
l(p2, z1') + l(p1, z2') with l = 2 - 2 cos; no gradient reaches the target.

Defaults (engine/recipe_ssl.py BYOLSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/byol.yaml: projector 4096 -> 256, predictor 4096, tau 0.99 -> 1.0, LARS lr 1.0
(eta 0.02, clipped, biases and norms excluded), weight decay 1e-5, probe lr 0.1, batch 256, 1000
epochs, the asymmetric views (preset "byol"). Architecture: solo-learn solo/methods/byol.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.data import DataBundle
from engine.methods.ssl_base import SSLMethod, frozen_copy, full_precision, mlp
from engine.methods.ssl_zoo_losses import byol_loss, normalized_std
from engine.recipe import Recipe


class BYOL(SSLMethod):
    name, preset = "byol", "byol"

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        self.target = frozen_copy(self.model).to(device)

    def build_projector(self, feature_dim: int) -> nn.Module:
        return mlp([feature_dim, self.cfg.proj_hidden_dim, self.cfg.proj_dim])

    def build_predictor(self) -> nn.Module:
        return mlp([self.cfg.proj_dim, self.cfg.pred_hidden_dim, self.cfg.proj_dim])

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        z = [self.model.projector(f) for f in feats]
        p = [self.model.predictor(x) for x in z]
        with torch.no_grad():
            targets = [self.target.projector(self.target(v)) for v in views]
        with full_precision(self.device):
            loss = byol_loss([x.float() for x in p], [x.float() for x in targets])
        out = {"loss": loss, "z_std": normalized_std(torch.cat(z))}
        if training:
            out["tau"] = torch.tensor(self.momentum(self.step + 1))
        return out

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.update_target(self.target, step)
