"""HSAKD auxiliary-branch models (Yang et al., "Hierarchical Self-supervised Augmented KD").

Three branches hang off the outputs of stages 1, 2 and 3. Each one re-runs the rest of the
network's stage structure so that every branch ends at the last stage's width and resolution:

    branch 1: stage-2-like blocks (stride 2) + stage-3-like blocks (stride 2)
    branch 2: stage-3-like blocks (stride 2)
    branch 3: one more stage-3-like group (stride 1)

each with as many blocks per stage as the backbone, then (pre-activation families only)
BN + ReLU, global average pooling and a Linear(width -> 4 * num_classes) over the joint
(class, rotation) labels. `backbone` is a plain zoo model, so a plain checkpoint loads into it
with strict=True. Branch module names (`auxiliary_classifier.block_extractor1`, `fc1`, ...)
follow the reference repository (winycg/HSAKD) so its checkpoints load too.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from engine.models import resnet, wrn
from engine.models.base import Features, ImageClassifier, init_he_fan_out


class AuxiliaryClassifier(nn.Module):
    """The three branches: extractor -> [BN-ReLU] -> pool -> linear."""

    def __init__(self, extractors: list[nn.Module], width: int, num_outputs: int, final_bn: bool) -> None:
        super().__init__()
        self.num_branches = len(extractors)
        for i, extractor in enumerate(extractors, start=1):
            setattr(self, f"block_extractor{i}", extractor)
            if final_bn:
                setattr(self, f"bn{i}", nn.BatchNorm2d(width))
            setattr(self, f"fc{i}", nn.Linear(width, num_outputs))
        self.final_bn = final_bn
        self.relu = nn.ReLU(inplace=True)
        init_he_fan_out(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        logits = []
        for i, x in enumerate(feats[: self.num_branches], start=1):
            x = getattr(self, f"block_extractor{i}")(x)
            if self.final_bn:
                x = self.relu(getattr(self, f"bn{i}")(x))
            logits.append(getattr(self, f"fc{i}")(ImageClassifier.global_pool(x)))
        return logits


class AuxiliaryModel(nn.Module):
    """backbone + branches. forward(x) -> (main logits (B, C), [aux logits (B, 4C)] * 3);
    forward(x, features=True, preact=...) -> the backbone's Features (no branches run)."""

    def __init__(self, backbone: ImageClassifier, auxiliary_classifier: AuxiliaryClassifier) -> None:
        super().__init__()
        self.backbone = backbone
        self.auxiliary_classifier = auxiliary_classifier

    def forward(
        self, x: Tensor, detach_features: bool = False, features: bool = False, preact: bool = False
    ) -> tuple[Tensor, list[Tensor]] | Features:
        """`detach_features=True` stops the branches' gradients at the backbone (HSAKD's frozen
        mode; the reference's default `grad=False`). Training runs pass gradients through.
        `features=True` is the plain models' feature interface, so a feature-distillation method
        treats an auxiliary student like its backbone."""
        if features:
            return self.backbone(x, features=True, preact=preact)
        if preact:
            raise ValueError("preact=True needs features=True")
        f = self.backbone(x, features=True)
        stage_outputs = [s.detach() for s in f.stages[:3]] if detach_features else f.stages[:3]
        return f.logits, self.auxiliary_classifier(stage_outputs)


def resnet_auxiliary(backbone: resnet.CifarResNet) -> AuxiliaryClassifier:
    w, n = backbone.widths, backbone.blocks_per_stage
    extractors = [
        nn.Sequential(resnet.make_layer(w[1], w[2], n, stride=2), resnet.make_layer(w[2], w[3], n, stride=2)),
        nn.Sequential(resnet.make_layer(w[2], w[3], n, stride=2)),
        nn.Sequential(resnet.make_layer(w[3], w[3], n, stride=1)),
    ]
    # Post-activation blocks already end in ReLU: no extra BN.
    return AuxiliaryClassifier(extractors, w[3], 4 * backbone.fc.out_features, final_bn=False)


def wrn_auxiliary(backbone: wrn.WideResNet) -> AuxiliaryClassifier:
    w, n = backbone.widths, backbone.blocks_per_stage
    extractors = [
        nn.Sequential(wrn.NetworkBlock(n, w[1], w[2], 2), wrn.NetworkBlock(n, w[2], w[3], 2)),
        nn.Sequential(wrn.NetworkBlock(n, w[2], w[3], 2)),
        nn.Sequential(wrn.NetworkBlock(n, w[3], w[3], 1)),
    ]
    # Pre-activation blocks end in a raw sum: BN-ReLU before pooling, like the backbone's head.
    return AuxiliaryClassifier(extractors, w[3], 4 * backbone.fc.out_features, final_bn=True)


def _aux_factory(plain: Callable[[int], ImageClassifier], branches: Callable) -> Callable[..., AuxiliaryModel]:
    def factory(num_classes: int = 10) -> AuxiliaryModel:
        backbone = plain(num_classes)
        return AuxiliaryModel(backbone, branches(backbone))

    factory.__name__ = factory.__qualname__ = f"{plain.__name__}_aux"
    factory.__doc__ = f"{plain.__name__} with HSAKD's three auxiliary branches."
    return factory


resnet8_aux = _aux_factory(resnet.resnet8, resnet_auxiliary)
resnet14_aux = _aux_factory(resnet.resnet14, resnet_auxiliary)
resnet20_aux = _aux_factory(resnet.resnet20, resnet_auxiliary)
resnet32_aux = _aux_factory(resnet.resnet32, resnet_auxiliary)
resnet44_aux = _aux_factory(resnet.resnet44, resnet_auxiliary)
resnet56_aux = _aux_factory(resnet.resnet56, resnet_auxiliary)
resnet110_aux = _aux_factory(resnet.resnet110, resnet_auxiliary)
resnet8x4_aux = _aux_factory(resnet.resnet8x4, resnet_auxiliary)
resnet32x4_aux = _aux_factory(resnet.resnet32x4, resnet_auxiliary)
wrn_16_1_aux = _aux_factory(wrn.wrn_16_1, wrn_auxiliary)
wrn_16_2_aux = _aux_factory(wrn.wrn_16_2, wrn_auxiliary)
wrn_40_1_aux = _aux_factory(wrn.wrn_40_1, wrn_auxiliary)
wrn_40_2_aux = _aux_factory(wrn.wrn_40_2, wrn_auxiliary)
