"""SimSiam (Chen & He 2021, arXiv:2011.10566): two views, a predictor and a stop-gradient, no target.

backbone -> projector (3 layers, BN after each, the last affine-free) -> predictor (bottleneck);
loss D(p1, z2) / 2 + D(p2, z1) / 2 with D the negative cosine and z detached (the stop-gradient
that prevents collapse). The predictor trains at the base lr, outside the schedule (the paper's
sec. 4.4 "fixed lr for the predictor"; solo-learn's static_lr).

Defaults (engine/recipe_ssl.py SimSiamSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/simsiam.yaml: projector 2048 -> 2048, predictor 512, SGD lr 0.5, weight decay
1e-5, probe lr 0.1, batch 256, 1000 epochs, views "symmetric_weak" (preset "simsiam"). Architecture:
solo-learn solo/methods/simsiam.py (its frozen bias before the affine-free BN is left out: a BN
subtracts it again, so the network computes the same function).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.methods.ssl_base import SSLMethod, full_precision, mlp
from engine.methods.ssl_zoo_losses import normalized_std, simsiam_loss


class SimSiam(SSLMethod):
    name, preset = "simsiam", "simsiam"

    def build_projector(self, feature_dim: int) -> nn.Module:
        c = self.cfg
        return mlp([feature_dim, c.proj_hidden_dim, c.proj_hidden_dim, c.proj_dim],
                   hidden_bias=False, last_bias=False, last_bn=True)

    def build_predictor(self) -> nn.Module:
        return mlp([self.cfg.proj_dim, self.cfg.pred_hidden_dim, self.cfg.proj_dim], hidden_bias=False)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        return list(self.model.predictor.parameters()) if self.cfg.fixed_pred_lr else []

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        z1, z2 = (self.model.projector(f) for f in feats)
        p1, p2 = self.model.predictor(z1), self.model.predictor(z2)
        with full_precision(self.device):
            loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
        return {"loss": loss, "z_std": normalized_std(torch.cat([z1, z2]))}
