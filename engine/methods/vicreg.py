"""VICReg (Bardes et al. 2022, arXiv:2105.04906): invariance, variance and covariance terms.

backbone -> projector (Linear-BN-ReLU x2 -> Linear); loss 25 * MSE(z1, z2) + 25 * (variance hinge of
each view) + 1 * (off-diagonal covariance of each view), eps 1e-4. Under torchrun the variance and
covariance use the global batch gathered with gradients (facebookresearch/vicreg main_vicreg.py and
solo-learn solo/losses/vicreg.py gather there); the invariance term is this rank's pairs.

Defaults (engine/recipe_ssl.py VICRegSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/vicreg.yaml: projector 2048 -> 2048, weights 25 / 25 / 1, LARS lr 0.3 (eta
0.02, clipped, biases and norms excluded), weight decay 1e-4, probe lr 0.1, batch 256, 1000 epochs,
its own views (crop 0.2-1, saturation 0.2, solarisation 0.1: preset "vicreg").
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.methods.ssl_base import SSLMethod, full_precision, mlp
from engine.methods.ssl_zoo_losses import vicreg_terms


class VICReg(SSLMethod):
    name, preset = "vicreg", "vicreg"

    def build_projector(self, feature_dim: int) -> nn.Module:
        c = self.cfg
        return mlp([feature_dim, c.proj_hidden_dim, c.proj_hidden_dim, c.proj_dim])

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        c = self.cfg
        z1, z2 = (self.model.projector(f) for f in feats)
        with full_precision(self.device):
            invariance, variance, covariance = vicreg_terms(z1.float(), z2.float(), c.eps, gather=training)
        loss = c.sim_weight * invariance + c.var_weight * variance + c.cov_weight * covariance
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}
