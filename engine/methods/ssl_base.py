"""What the six methods of the self-supervised zoo share, so each method module is its loss and targets.

- The network is `SSLNet`: the zoo backbone, a projector and (BYOL, SimSiam) a predictor. Checkpoints
  hold it as `backbone.*` / `projector.*` / `predictor.*`, so linear_eval and finetune load the
  backbone unchanged (engine/methods/pretrained.py), as they do SimCLR's.
- The backbone's own classifier is the online linear probe (solo-learn's habit, solo/methods/base.py:
  `self.classifier(feats.detach())`, cross-entropy on the training labels averaged over the large
  crops, its own param group with lr `classifier_lr` and no weight decay). Its input is detached, so it
  never shapes the features; it is logged as train top1 and evaluated as `linear_top1`.
- Views come from engine/data/views.py presets (solo-learn's CIFAR augmentations), changed where the
  recipe says (`[ssl.every_view]`, `[[ssl.per_view]]`), plus DINO's local crops. Every view is its own
  forward pass, so batch norm normalises each view by itself, as solo-learn's training_step does.
- Target networks (BYOL, MoCo, DINO) are frozen deep copies of the backbone + projector: no gradient,
  not in the optimizer, in train mode like solo-learn's momentum backbone (batch statistics), and their
  parameters change only by the EMA after each optimizer step, with the cosine-rising momentum of
  solo-learn solo/utils/momentum.py (update k uses tau(k - 1), tau(0) = base_tau). The probe copy
  inside a target's backbone is never used and never updated.
- Representation quality is monitored with the weighted kNN top-1 of SimCLR (k 200, T 0.1) and the
  probe's top-1; `loss` on val/test is the method's loss on views drawn from a fixed seed plus the
  probe's cross-entropy on the un-augmented images (both per-sample means, as torchrun's sharded
  evaluation expects).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.data import augment as aug
from engine.methods.base import Method, StepOutput
from engine.methods.pretrained import classifier_keys
from engine.methods.simclr import KNNMonitor, require_full_batches
from engine.methods.ssl_losses import knn_predict, world_size
from engine.methods.ssl_zoo_losses import cosine_momentum, ema_parameters_
from engine.recipe import Recipe, RecipeError


class SSLNet(nn.Module):
    """backbone -> projector [-> predictor]; forward(x) is the backbone's pooled features."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector
        if predictor is not None:
            self.predictor = predictor

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)


def mlp(dims: list[int], batch_norm: bool = True, activation: type[nn.Module] = nn.ReLU,
        hidden_bias: bool = True, last_bias: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear [-> BatchNorm1d] -> activation for each hidden size in dims[1:-1], then a last Linear
    (and an affine-free BatchNorm1d after it if last_bn: SimSiam's projector)."""
    layers: list[nn.Module] = []
    for a, b in pairwise(dims[:-1]):
        layers += [nn.Linear(a, b, bias=hidden_bias), *([nn.BatchNorm1d(b)] if batch_norm else []), activation()]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def frozen_copy(net: SSLNet) -> SSLNet:
    """The target network: a deep copy of backbone + projector that no gradient ever reaches."""
    return SSLNet(copy.deepcopy(net.backbone), copy.deepcopy(net.projector)).requires_grad_(False)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Losses in fp32 whatever train.precision (cross-correlations and softmaxes over thousands of dims)."""
    with torch.autocast(device.type, enabled=False):
        yield


def view_specs(recipe: Recipe, default_preset: str, image_size: int) -> tuple[Any, ...]:
    """The method's views: a preset, `[ssl.every_view]` on each, DINO's local crops, `[[ssl.per_view]]`."""
    from engine.data.views import VIEW_PRESETS

    cfg, where = recipe.ssl, f"recipe {recipe.run.name!r}"
    name = cfg.views or default_preset
    if name not in VIEW_PRESETS:
        raise RecipeError(where, "ssl.views", f"unknown preset {name!r}; expected one of {', '.join(VIEW_PRESETS)}")
    specs = [replace(spec, **cfg.every_view.changes()) for spec in VIEW_PRESETS[name]]
    if len(specs) != 2:
        raise RecipeError(where, "ssl.views", f"preset {name!r} has {len(specs)} views; the zoo trains on 2 "
                                              "global views (DINO adds ssl.local_crops)")
    if cfg.local_crops:  # DINO's local_transfo (facebookresearch/dino main_dino.py): small crop, blur p 0.5
        local = replace(specs[0], size=cfg.local_crop_size or max(image_size // 2, 4),
                        crop_scale=cfg.local_crop_scale, blur_p=0.5, solarize_p=0.0)
        specs += [local] * cfg.local_crops
    if len(cfg.per_view) > len(specs):
        raise RecipeError(where, "ssl.per_view", f"{len(cfg.per_view)} entries for {len(specs)} views")
    overrides = [*cfg.per_view, *[None] * (len(specs) - len(cfg.per_view))]
    return tuple(spec if override is None else replace(spec, **override.changes())
                 for spec, override in zip(specs, overrides, strict=True))


class SSLMethod(Method):
    """Base of the zoo: subclasses build the projector (and predictor), `ssl_loss`, and their targets."""

    drop_last = True  # equal batches on every rank (gathers) and per view (batch statistics)
    name = ""  # the method's sub-table: [ssl.<name>]
    preset = ""  # its default views: engine/data/views.py VIEW_PRESETS
    global_views = 2

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        require_full_batches(recipe, data, self.name)
        if recipe.data.batch_size % world_size():
            raise RecipeError(f"recipe {recipe.run.name!r}", "data.batch_size",
                              f"{recipe.data.batch_size} does not split evenly over {world_size()} processes; "
                              f"{self.name} gathers equal shares of the global batch")
        super().__init__(recipe, data, device)
        self.specs = view_specs(recipe, self.preset, data.image_size)
        self.knn = KNNMonitor(data, device, recipe.ssl.knn_k, recipe.ssl.knn_temperature)
        self._bank: tuple[int, Tensor, Tensor] | None = None
        self._ema: tuple[list[Tensor], list[Tensor]] | None = None
        batches = data.train.num_batches(recipe.data.batch_size, drop_last=True)
        self.total_steps = recipe.train.epochs * min(batches, recipe.train.max_steps_per_epoch or batches)
        self.step = 0

    @property
    def cfg(self) -> Any:
        """This method's `[ssl.<name>]` table."""
        return getattr(self.recipe.ssl, self.name)

    @property
    def probe(self) -> nn.Linear:
        return self.model.backbone.classifier

    # ---- construction -------------------------------------------------------
    def build_model(self) -> nn.Module:
        backbone = super().build_model()
        return SSLNet(backbone, self.build_projector(backbone.feature_dim), self.build_predictor())

    def build_projector(self, feature_dim: int) -> nn.Module:
        raise NotImplementedError

    def build_predictor(self) -> nn.Module | None:
        return None

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the base lr, outside the schedule (SimSiam's predictor)."""
        return []

    def parameter_groups(self) -> list[dict[str, Any]]:
        probe = list(self.probe.parameters())
        fixed = self.fixed_lr_parameters()
        apart = {id(p) for p in (*probe, *fixed)}
        main = [p for p in self.model.parameters() if p.requires_grad and id(p) not in apart]
        groups = [{"params": main}, {"params": probe, "lr": self.recipe.ssl.probe_lr, "weight_decay": 0.0}]
        return groups + ([{"params": fixed, "fixed_lr": True}] if fixed else [])

    def state_modules(self) -> dict[str, nn.Module]:
        """Targets, queues, centres: saved, restored and synced by the trainer with the model."""
        return {}

    def modules_to_save(self) -> dict[str, nn.Module]:
        return {"model": self.model, **self.state_modules()}

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))

    # ---- training -----------------------------------------------------------
    def train_mode(self) -> None:
        for module in self.modules_to_save().values():
            module.train()

    def views(self, images: Tensor, generator: torch.Generator) -> list[Tensor]:
        """One normalised batch per view spec: the global views first, then DINO's local ones."""
        from engine.data.views import make_views

        return make_views(images, generator, self.specs, self.data.mean, self.data.std)

    def ssl_loss(self, views: list[Tensor], feats: list[Tensor], training: bool) -> dict[str, Tensor]:
        """{"loss": the method's loss, other scalars to log}. training=False (evaluation): no state
        changes (queue, centre) and no collectives (ranks hold different numbers of rows)."""
        raise NotImplementedError

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        views = self.views(images, generator)
        feats = [self.model(v) for v in views]  # one pass per view: batch norm sees each view alone
        terms = self.ssl_loss(views, feats, training=True)
        logits = self.probe(torch.cat([f.detach() for f in feats[:self.global_views]]))
        targets = labels.repeat(self.global_views)
        probe_loss = F.cross_entropy(logits.float(), targets)
        ssl = terms.pop("loss")
        return {"loss": ssl + probe_loss, "loss_ssl": ssl.detach(), "loss_probe": probe_loss.detach(),
                **{k: v.detach() for k, v in terms.items()}, "logits": logits.detach(), "labels": targets}

    def after_optimizer_step(self, step: int) -> None:
        self.step = step

    # ---- momentum targets ---------------------------------------------------
    def momentum(self, step: int) -> float:
        """tau for the EMA after optimizer step `step` (1-based): tau(step - 1) on the cosine."""
        return cosine_momentum(step - 1, self.total_steps, self.cfg.base_tau, self.cfg.final_tau)

    def update_target(self, target: SSLNet, step: int) -> None:
        """target <- tau target + (1 - tau) online over backbone (but its probe) and projector."""
        if self._ema is None:  # built on first use: after the trainer's channels_last / compile
            skip = {f"backbone.{name}" for name in classifier_keys(self.model.backbone)}
            online = dict(self.model.named_parameters())
            kept = [(name, p) for name, p in target.named_parameters() if name not in skip]
            self._ema = [p for _, p in kept], [online[name] for name, _ in kept]
        ema_parameters_(*self._ema, self.momentum(step))

    # ---- evaluation ---------------------------------------------------------
    def _train_bank(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Features of the training split, recomputed once per optimizer step count (val, then test)."""
        if self._bank is None or self._bank[0] != self.step:
            self._bank = (self.step, *self.knn.encode(self.model, self.data.train, batch_size))
        return self._bank[1], self._bank[2]

    @torch.no_grad()
    def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
        modules = list(self.modules_to_save().values())
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        generator = torch.Generator().manual_seed(self.recipe.train.seed)
        ssl_total, ssl_rows, feats, labels = 0.0, 0, [], []
        for images, y, _ in split.batches(batch_size, shuffle=False, drop_last=False, device=self.device):
            feats.append(self.model(aug.normalize(images, self.data.mean, self.data.std)).float())
            labels.append(y)
            if len(images) > 1:  # batch statistics need two rows
                views = self.views(images, generator)
                loss = self.ssl_loss(views, [self.model(v) for v in views], training=False)["loss"]
                ssl_total, ssl_rows = ssl_total + float(loss) * len(images), ssl_rows + len(images)
        metrics = {"loss": 0.0, "loss_ssl": ssl_total / max(ssl_rows, 1), "loss_probe": 0.0,
                   "linear_top1": 0.0, "knn_top1": 0.0}
        if feats:
            feats_t, labels_t = torch.cat(feats), torch.cat(labels)
            logits = self.probe(feats_t).float()
            metrics["loss_probe"] = float(F.cross_entropy(logits, labels_t))
            metrics["linear_top1"] = float((logits.argmax(dim=1) == labels_t).float().mean())
            bank, bank_labels = self._train_bank(batch_size)
            predicted = knn_predict(feats_t, bank, bank_labels, self.data.num_classes, self.knn.k,
                                    self.knn.temperature)
            metrics["knn_top1"] = float((predicted == labels_t).float().mean())
        metrics["loss"] = metrics["loss_ssl"] + metrics["loss_probe"]
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
        return metrics
