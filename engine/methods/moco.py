"""MoCo v2+ (He et al. 2020, Chen et al. 2020; solo-learn's symmetric variant): queries against a
momentum encoder's keys and a queue of past keys.

Online: backbone -> projector (Linear-ReLU-Linear) -> L2 norm = queries; key encoder: an EMA of
backbone + projector (engine/methods/ssl_base.py), momentum rising on a cosine from base_tau to
final_tau. One queue per view of past keys, [2, K, D], with one write pointer: the loss is
(InfoNCE(q1, k2, queue of view 2) + InfoNCE(q2, k1, queue of view 1)) / 2 with the positive at
logit 0; afterwards both views' keys are enqueued, FIFO, wrapping at the end. Under torchrun the
keys enqueued are every rank's, gathered without gradients, so all ranks keep the same queue. The
queue and its pointer are buffers of a saved module: resume restores them exactly.

Defaults (engine/recipe_ssl.py MoCoSection) are solo-learn's CIFAR recipe, vturrisi/solo-learn
scripts/pretrain/cifar/mocov2plus.yaml: projector 2048 -> 256, queue 32768, T 0.2, tau 0.99 -> 0.999,
SGD lr 0.3, weight decay 1e-4, probe lr 0.3, batch 256, 1000 epochs, views "symmetric_weak" (preset
"mocov2plus"). Method: solo-learn solo/methods/mocov2plus.py, solo/losses/mocov2plus.py. Unlike
facebookresearch/moco, no shuffle-BN (solo-learn relies on sync batch norm instead: train.sync_bn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle
from engine.methods.ssl_base import SSLMethod, frozen_copy, full_precision, mlp
from engine.methods.ssl_zoo_losses import enqueue_, gather_no_grad, moco_loss
from engine.recipe import Recipe


class KeyQueue(nn.Module):
    """Past keys, one queue per view ([views, K, D], L2-normalised random at start) and the pointer."""

    keys: Tensor
    pointer: Tensor

    def __init__(self, views: int, size: int, dim: int, seed: int) -> None:
        super().__init__()
        noise = torch.randn(views, size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("keys", F.normalize(noise, dim=-1))
        self.register_buffer("pointer", torch.zeros(1, dtype=torch.long))

    def push(self, keys: Tensor) -> None:
        """Enqueue [views, N, D] keys (this step's, every rank's)."""
        enqueue_(self.keys, self.pointer, keys)


class MoCo(SSLMethod):
    name, preset = "moco", "mocov2plus"

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        self.target = frozen_copy(self.model).to(device)
        self.queue = KeyQueue(self.global_views, self.cfg.queue_size, self.cfg.proj_dim, recipe.train.seed).to(device)

    def build_projector(self, feature_dim: int) -> nn.Module:
        return mlp([feature_dim, self.cfg.proj_hidden_dim, self.cfg.proj_dim], batch_norm=False)

    def state_modules(self) -> dict[str, nn.Module]:
        return {"target": self.target, "queue": self.queue}

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        q1, q2 = (F.normalize(self.model.projector(f).float(), dim=-1) for f in feats)
        with torch.no_grad():
            k1, k2 = (F.normalize(self.target.projector(self.target(v)).float(), dim=-1) for v in views)
        queue = self.queue.keys.clone()  # the enqueue below must not touch what backward reads
        temperature = self.cfg.temperature
        with full_precision(self.device):
            loss = (moco_loss(q1, k2, queue[1], temperature) + moco_loss(q2, k1, queue[0], temperature)) / 2
        out = {"loss": loss}
        if training:
            self.queue.push(torch.stack([gather_no_grad(k1), gather_no_grad(k2)]))
            out["tau"] = torch.tensor(self.momentum(self.step + 1))
        return out

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.update_target(self.target, step)
