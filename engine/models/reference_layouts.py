"""How the reference implementations name their parameters, mapped onto kdtui's models.

A checkpoint written by the reference code holds the state dict of the reference's own classes.
kdtui kept their module names wherever it could, so most names agree already; where they do not,
one table per architecture says how to translate: a list of (reference key pattern, kdtui key
pattern) rules, regular expressions matched against the whole key, the first match wins, a key
that matches none is kept as it is. Nothing is inferred from a file's keys: the table of the arch
the user names (`[teacher] arch`) is the only translation, and whatever still does not fit after
it is refused by the strict load that follows (engine/teacher.py).

Sources (reference file -> kdtui module), per table:
- CIFAR ResNets resnet8 ... resnet110, resnet8x4, resnet32x4: HobbitLong/RepDistiller
  models/resnet.py (HSAKD and mdistiller carry the same file) -> engine/models/resnet.py. Identity:
  conv1, bn1, layerN.M.{conv1,bn1,conv2,bn2}, layerN.0.downsample.{0,1}, fc.
- Wide ResNets wrn_16_1 ... wrn_40_2: RepDistiller models/wrn.py -> engine/models/wrn.py. Identity:
  conv1, blockN.layer.M.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc. wrn_28_2 (MixMatch) uses
  the same generic names.
- VGG vgg8 / vgg11 / vgg13: RepDistiller models/vgg.py `vgg*_bn` -> engine/models/vgg.py. Identity:
  blockN.I (conv, BN) indices and `classifier`; the pools have no parameters.
- MobileNetV2: RepDistiller models/mobilenetv2.py `mobile_half` wraps its last linear layer in a
  one-element Sequential: classifier.0.* -> classifier.*. HSAKD's `mobilenetV2` names it
  `classifier.*` already, but has a stride-1 stem where RepDistiller and kdtui have stride 2: its
  weights fit, its outputs would not be the reference's. Use RepDistiller's mobile_half teachers.
- ShuffleNets shufflev1 / shufflev2: RepDistiller models/ShuffleNetv1.py, ShuffleNetv2.py ->
  engine/models/shufflenetv1.py, shufflenetv2.py. Identity (shortcuts, shuffle and split blocks
  have no parameters).
- resnet18 / resnet50: RepDistiller models/resnetv2.py (`ResNet18`, `ResNet50`; mdistiller's copy
  too) -> kdtui's torchvision-named networks: layerN.M.shortcut.{0,1} -> layerN.M.downsample.{0,1},
  linear -> fc. torchvision-layout state dicts (the names kdtui writes) pass unchanged.
- resnet18_imagenet: torchvision's resnet18 state dict. Identity.
- *_aux: winycg/HSAKD models/resnet.py, wrn.py (`ResNet_Auxiliary`, `WideResNet_Auxiliary`):
  backbone.* plus auxiliary_classifier.{block_extractorI.*, bnI (WRN only), fcI}. Identity
  (engine/models/auxiliary.py chose the same names).

Torch-free: a state dict is only renamed here, its tensors are not touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")
Rule = tuple[str, str]  # (reference key pattern, kdtui key template): re.fullmatch, then Match.expand

IDENTITY: tuple[Rule, ...] = ()
MOBILE_HALF: tuple[Rule, ...] = ((r"classifier\.0\.(weight|bias)", r"classifier.\1"),)
RESNET_V2: tuple[Rule, ...] = (
    (r"(layer\d+\.\d+)\.shortcut\.([01])\.(.+)", r"\1.downsample.\2.\3"),
    (r"linear\.(weight|bias)", r"fc.\1"),
)

_CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                  "resnet8x4", "resnet32x4")
_WRNS = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")

LAYOUTS: dict[str, tuple[Rule, ...]] = {
    **{arch: IDENTITY for arch in _CIFAR_RESNETS},
    **{arch: IDENTITY for arch in (*_WRNS, "wrn_28_2")},
    **{arch: IDENTITY for arch in ("vgg8", "vgg11", "vgg13")},
    "mobilenetv2": MOBILE_HALF,
    "shufflev1": IDENTITY,
    "shufflev2": IDENTITY,
    "resnet18": RESNET_V2,
    "resnet50": RESNET_V2,
    "resnet18_imagenet": IDENTITY,
    **{f"{arch}_aux": IDENTITY for arch in (*_CIFAR_RESNETS, *_WRNS)},
}

_COMPILED: dict[str, list[tuple[re.Pattern[str], str]]] = {
    arch: [(re.compile(pattern), template) for pattern, template in rules] for arch, rules in LAYOUTS.items()
}


class LayoutError(ValueError):
    """A state dict that the arch's table cannot translate (no table, or two keys onto one name)."""


def to_kdtui_names(state: Mapping[str, V], arch: str) -> dict[str, V]:
    """`state` with every key translated by `arch`'s table (values untouched, order kept)."""
    if arch not in _COMPILED:
        raise LayoutError(f"no reference layout is known for arch {arch!r} (engine/models/reference_layouts.py)")
    renamed: dict[str, V] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = next((m.expand(t) for p, t in _COMPILED[arch] if (m := p.fullmatch(key))), key)
        if new in renamed:
            raise LayoutError(f"keys {origin[new]!r} and {key!r} both stand for {arch}'s {new!r}")
        renamed[new], origin[new] = value, key
    return renamed
