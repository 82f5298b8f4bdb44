"""The linear evaluation protocol: new linear layers on a frozen, pretrained backbone.

Frozen means all three of: every backbone parameter has requires_grad=False and is left out
of the optimizer, the backbone stays in eval() (batch-norm running statistics are read, never
updated), and features are computed under no_grad. `self.model` is a plain zoo model whose
classifier always equals the trained head (two bias-carrying linear layers with nothing in
between compose to one), so checkpoints are ordinary `model.arch` classifiers that
`kdtui eval`, diff and fine-tuning load like any other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle, Split
from engine.data import augment as aug
from engine.methods.base import Method, StepOutput
from engine.methods.pretrained import backbone_checkpoint, load_backbone
from engine.recipe import Recipe


class FeatureCache:
    """Backbone features of every image of a split, computed once in the split's order and
    looked up by the batch's row indices (which the trainer passes to train_step)."""

    def __init__(self, encoder: Callable[[Tensor], Tensor], split: Split, batch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        with torch.no_grad():
            self.features = torch.cat([
                encoder(aug.normalize(images, mean, std)).float()
                for images, _, _ in split.batches(batch_size, shuffle=False, drop_last=False, device=device)])

    def lookup(self, indices: Tensor) -> Tensor:
        return self.features.index_select(0, indices.to(self.features.device))


class LinearEval(Method):
    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        cfg = recipe.linear_eval
        self.model.requires_grad_(False)
        self.model.eval()
        classifier = self.model.classifier
        if cfg.layers == 1:
            self.head: nn.Module = classifier
        else:
            self.head = nn.Sequential(nn.Linear(classifier.in_features, cfg.hidden_dim),
                                      nn.Linear(cfg.hidden_dim, classifier.out_features)).to(device)
            self.fold_head()
        self.head.requires_grad_(True)
        self.cache: FeatureCache | None = None
        if cfg.precompute:
            self.cache = FeatureCache(self.model.forward_features, data.train, recipe.data.eval_batch_size,
                                      data.mean, data.std, device)

    def build_model(self) -> nn.Module:
        """The target-sized classifier with every weight but the classifier from the pretrained run."""
        from engine.models import build_model

        r = self.recipe
        model = build_model(r.model.arch, r.model.num_classes or self.data.num_classes)
        if not r.linear_eval.random_backbone:
            load_backbone(model, backbone_checkpoint(r), r.model.arch, r.teacher.arch)
        return model

    @torch.no_grad()
    def fold_head(self) -> None:
        """classifier <- W2 W1 x + (W2 b1 + b2): the two trained layers as the model's one."""
        if self.head is self.model.classifier:
            return
        first, second = self.head[0], self.head[1]
        weight = second.weight.double() @ first.weight.double()
        bias = second.weight.double() @ first.bias.double() + second.bias.double()
        self.model.classifier.weight.copy_(weight)
        self.model.classifier.bias.copy_(bias)

    def parameter_groups(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def modules_to_save(self) -> dict[str, nn.Module]:
        if self.head is self.model.classifier:
            return {"model": self.model}
        return {"model": self.model, "head": self.head}

    def train_mode(self) -> None:
        self.model.eval()  # never train(): batch-norm statistics must not move
        self.head.train()

    def features(self, images: Tensor, generator: torch.Generator, indices: Tensor | None) -> Tensor:
        with torch.no_grad():
            if self.cache is not None:
                if indices is None:
                    raise ValueError("linear_eval.precompute: train_step needs the batch's row indices")
                return self.cache.lookup(indices)
            return self.model.forward_features(self.augment(images, generator)).float()

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        logits = self.head(self.features(images, generator, indices))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.recipe.train.label_smoothing)
        return {"loss": loss, "logits": logits.detach(), "labels": labels}

    def after_optimizer_step(self, step: int) -> None:
        self.fold_head()
