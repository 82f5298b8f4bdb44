"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): the cross-correlation of two views'
batch-standardised embeddings is pushed to the identity.

backbone -> projector (Linear-BN-ReLU x2 -> Linear); loss scale * (sum_i (1 - C_ii)^2 +
lambda sum_{i != j} C_ij^2). Under torchrun the embeddings of every rank are gathered with
gradients before standardising, so C and its gradient are those of the global batch (the
reference does the same with sync batch norm and an all-reduce of C).

Defaults (engine/recipe_ssl.py BarlowTwinsSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/barlow.yaml: projector 2048 -> 2048, scale_loss 0.1, lambda 0.0051 (solo-learn
solo/methods/barlow_twins.py default; the paper's 5e-3), LARS lr 0.3 (eta 0.02, clipped, biases and
norms excluded), weight decay 1e-4, probe lr 0.1, batch 256, 1000 epochs, asymmetric views (preset
"barlow_twins"). Loss: solo-learn solo/losses/barlow.py.
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.methods.ssl_base import SSLMethod, full_precision, mlp
from engine.methods.ssl_zoo_losses import barlow_twins_loss


class BarlowTwins(SSLMethod):
    name, preset = "barlow_twins", "barlow_twins"

    def build_projector(self, feature_dim: int) -> nn.Module:
        c = self.cfg
        return mlp([feature_dim, c.proj_hidden_dim, c.proj_hidden_dim, c.proj_dim])

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        z1, z2 = (self.model.projector(f) for f in feats)
        with full_precision(self.device):
            loss = barlow_twins_loss(z1.float(), z2.float(), self.cfg.lamb, self.cfg.scale_loss, gather=training)
        return {"loss": loss}
