"""`ab`: activation-boundary transfer (Heo et al., AAAI 2019, "Knowledge Transfer via
Distillation of Activation Boundaries Formed by Hidden Neurons").

The student's pre-activation stage maps feat[1:-1] (RepDistiller's `preact=True` list) pass
through a connector and are pushed to the teacher's side of every neuron's activation boundary,
with a margin m. Per stage, summed over all elements (s: connected student, t: teacher):

    l(s, t) = (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]

Stage i of n is weighted 2^(i - n + 1) (the deepest 1, halving towards the stem), divided by
the batch size and scaled by 3 / 1000; the stages' terms are summed.

Schedule, as RepDistiller runs `--distill abound`: an initialisation phase of init_epochs (30)
trains the connector and the student's feature modules (everything but the classifier) on the
AB loss alone, at the main lr; then the main phase trains CE (+ KD) only, because
helper/loops.py sets loss_kd = 0 for abound (so the sample script's `-b 1` multiplies a zero):
feature_weight defaults to 0. The connector is kept in eval mode and out of the optimizer then
(module_list, not trainable_list); a feature_weight > 0 adds the AB loss through it, frozen.

Sources (HobbitLong/RepDistiller): distiller_zoo/AB.py (ABLoss: margin 1.0, weights, 3/1000),
models/util.py (Connector: identity where channels and size match, else ConvReg without ReLU;
the ConvReg is fitnet.py's), train_student.py and helper/pretrain.py (init_epochs 30, what the
init phase trains), helper/loops.py (loss_kd = 0 in the main phase, connector in eval mode).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.methods.zoo.base import FeatureDistill
from engine.methods.zoo.fitnet import ConvReg
from engine.models.base import Features

AB_SCALE = 3 / 1000  # ABLoss: `l / bsz / 1000 * 3`


def boundary_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Summed squared hinge pushing `source` (student) to the side of 0 where `target` (teacher) is."""
    off = (source + margin).pow(2) * ((source > -margin) & (target <= 0))
    on = (source - margin).pow(2) * ((source <= margin) & (target > 0))
    return (off + on).sum()


def ab_loss(sources: list[Tensor], targets: list[Tensor], margin: float = 1.0) -> Tensor:
    """sum_i 2^(i-n+1) * boundary_loss_i / batch * 3/1000 over the n stage pairs."""
    n, batch = len(sources), sources[0].shape[0]
    terms = [2.0 ** (i - n + 1) * boundary_loss(s, t, margin)
             for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
    return sum(terms) / batch * AB_SCALE


class Connector(nn.Module):
    """One map per stage pair: identity where channels and size already match, else ConvReg (no ReLU)."""

    def __init__(self, s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True), start=1):
            try:
                layers.append(nn.Identity() if s[1:3] == t[1:3] else ConvReg(s, t, use_relu=False))
            except ValueError as err:
                raise ValueError(f"ab: stage {i}: {str(err).removeprefix('fitnet: ')}") from None
        self.layers = nn.ModuleList(layers)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [layer(x) for layer, x in zip(self.layers, maps, strict=True)]


def preact_pairs(student: Features, teacher: Features) -> tuple[list[Tensor], list[Tensor]]:
    """The pre-activation stage maps feat[1:-1] of both networks, checked to pair one to one."""
    s, t = student.as_list(preact=True)[1:-1], teacher.as_list(preact=True)[1:-1]
    if len(s) != len(t):
        raise ValueError(f"ab: the student has {len(s)} stage maps and the teacher {len(t)}; "
                         "the method pairs them one to one")
    return s, t


class AB(FeatureDistill):
    preact = True
    default_feature_weight = 0.0  # loss_kd = 0 in the reference's main phase
    default_init_epochs = 30

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        s, t = preact_pairs(student, teacher)
        return nn.ModuleDict({"connector": Connector([x.shape for x in s], [x.shape for x in t])})

    @property
    def connector(self) -> Connector:
        return self.distill_modules["connector"]

    def init_parameters(self) -> list[nn.Parameter]:
        return list(self.connector.parameters()) + self.student_feature_parameters()

    def trainable_module_parameters(self) -> list[nn.Parameter]:
        return []  # the connector is frozen after the initialisation phase

    def train_mode(self) -> None:
        super().train_mode()
        frozen = self.phase != "init"
        self.connector.train(not frozen)
        self.connector.requires_grad_(not frozen)

    def init_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        s, t = preact_pairs(student, teacher)
        return ab_loss(self.connector(s), t, self.recipe.distill.ab.margin)

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        return self.init_loss(student, teacher, labels, indices)
