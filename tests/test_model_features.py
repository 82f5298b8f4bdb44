"""The feature interface (`model(x, features=True, preact=...)`) on every registered arch.

`Features.as_list(preact)` must be RepDistiller's `model(x, is_feat=True, preact=...)` list
(HobbitLong/RepDistiller models/*.py), because the distillation methods index it as the
reference does. The expected shapes below are written from the reference architecture
descriptions, not read off the models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models import build_model, count_parameters, model_names
from engine.models.base import Features
from engine.models.registry import is_auxiliary
from engine.models.shufflenetv1 import channel_shuffle

PLAIN = [a for a in model_names() if not is_auxiliary(a)]

Shape = tuple[int, int, int]


def _cifar_resnet(w: tuple[int, int, int, int]) -> tuple[list[Shape], Shape, int]:
    """3x3 stride-1 stem, three stages at 32, 16, 8 px (RepDistiller resnet.py)."""
    maps = [(w[0], 32, 32), (w[1], 32, 32), (w[2], 16, 16), (w[3], 8, 8)]
    return maps, maps[-1], w[3]


def _wrn(k: int) -> tuple[list[Shape], Shape, int]:
    """Stem conv to 16, groups of 16k, 32k, 64k at 32, 16, 8 px (RepDistiller wrn.py)."""
    maps = [(16, 32, 32), (16 * k, 32, 32), (32 * k, 16, 16), (64 * k, 8, 8)]
    return maps, maps[-1], 64 * k


def _torchvision_resnet(expansion: int, stem_px: int) -> tuple[list[Shape], Shape, int]:
    """64-channel stem, layers of 64..512 (x expansion) at strides 1, 2, 2, 2."""
    maps = [(64, stem_px, stem_px)] + [
        (c * expansion, stem_px >> i, stem_px >> i) for i, c in enumerate((64, 128, 256, 512))
    ]
    return maps, maps[-1], 512 * expansion


# arch -> ([f0, f1, ..., fk] as (C, H, W) at 32 px, the map the global pool reads, pooled width)
EXPECTED: dict[str, tuple[list[Shape], Shape, int]] = {
    **{f"resnet{d}": _cifar_resnet((16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar_resnet((32, 64, 128, 256)),
    "resnet32x4": _cifar_resnet((32, 64, 128, 256)),
    **{f"wrn_{d}_{k}": _wrn(k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 2))},
    # five conv blocks, max-pools after 0, 1, 2 (and 3 only at 64 px); f0 is before the first pool
    **{
        f"vgg{d}": ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], (512, 4, 4), 512)
        for d in (8, 11, 13)
    },
    # width 0.5: stride-2 stem to 16 ch; groups 1, 2, 4, 6 have 12, 16, 48, 160 ch; 1x1 conv to 1280
    "mobilenetv2": ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], (1280, 2, 2), 1280),
    # 1x1 stem to 24 ch at 32 px; each stage halves the resolution
    "shufflev1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], (960, 4, 4), 960),
    "shufflev2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], (1024, 4, 4), 1024),
    "resnet18": _torchvision_resnet(1, 32),
    "resnet18_imagenet": _torchvision_resnet(1, 8),  # 7x7 stride-2 conv + max-pool: 32 -> 8 px
    "resnet50": _torchvision_resnet(4, 32),
}
EXPECTED |= {a: EXPECTED[a.removesuffix("_aux")] for a in model_names() if is_auxiliary(a)}

# How each family's preact maps relate to its post maps (see _check_preact_relation).
RELU = {*(a for a in PLAIN if a.startswith("resnet")), "vgg8", "vgg11", "vgg13", "shufflev1"}
WRN = {a for a in PLAIN if a.startswith("wrn_")}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _randomize_bn(model: nn.Module) -> None:
    """Move every BN far from the identity, so a BN output cannot pass for its input and the
    maps before a ReLU have negative entries."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.5 * torch.randn(n, generator=g))


def _plain(model: nn.Module) -> nn.Module:
    return model.backbone if hasattr(model, "backbone") else model


def test_every_registered_arch_has_expected_shapes():
    assert set(EXPECTED) == set(model_names())


@pytest.mark.parametrize("arch", model_names())
def test_feature_lists_match_the_reference_layout(arch: str):
    model = build_model(arch, 10).eval()
    calls = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    x = _x()
    with torch.no_grad():
        f = model(x, features=True, preact=True)
        plain_f = model(x, features=True)
        out = model(x)
    assert calls == [{"features": True, "preact": True}, {"features": True}, {}]  # hooks see features=True
    assert isinstance(f, Features) and plain_f.preact is None

    maps, final, width = EXPECTED[arch]
    expected = [(2, *s) for s in maps] + [(2, width)]
    assert [tuple(t.shape) for t in f.as_list()] == expected
    assert [tuple(t.shape) for t in f.as_list(preact=True)] == expected
    assert tuple(f.final.shape) == (2, *final)
    with pytest.raises(ValueError, match="preact"):
        plain_f.as_list(preact=True)

    logits = out[0] if is_auxiliary(arch) else out
    torch.testing.assert_close(f.logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(plain_f.logits, logits, rtol=0, atol=0)
    for a, b in zip(f.as_list(), plain_f.as_list(), strict=True):  # asking for preact changes nothing else
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    backbone = _plain(model)
    with torch.no_grad():
        torch.testing.assert_close(f.pooled, backbone.forward_features(x), rtol=0, atol=0)
        stages = backbone.stage_features(x)
    torch.testing.assert_close(backbone.global_pool(f.final), f.pooled)
    assert [tuple(s.shape) for s in stages] == [(2, *s) for s in (*maps[1:4], final)]


@pytest.mark.parametrize("arch", PLAIN)
def test_preact_maps_are_the_reference_ones(arch: str):
    model = build_model(arch, 10).eval()
    _randomize_bn(model)
    x = _x()
    with torch.no_grad():
        post = model(x, features=True).stages  # the plain path's maps
        f = model(x, features=True, preact=True)
        pre = f.preact
        if arch in WRN:  # RepDistiller's get_bn_before_relu, applied to the post maps
            bns = (model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1)
            expected = [bn(p) for bn, p in zip(bns, post, strict=True)]
    assert len(pre) == len(post)
    if arch in RELU:
        for p, q in zip(pre, post, strict=True):
            assert (p < 0).any()
            torch.testing.assert_close(F.relu(p), q, rtol=0, atol=0)
    elif arch == "shufflev2":  # the reference's preact is the concatenation before the shuffle
        for p, q in zip(pre, post, strict=True):
            assert (p < 0).any()
            torch.testing.assert_close(channel_shuffle(F.relu(p), 2), q, rtol=0, atol=0)
    elif arch in WRN:
        for p, e, q in zip(pre, expected, post, strict=True):
            torch.testing.assert_close(p, e)
            assert not torch.allclose(p, q, atol=1e-3)
        torch.testing.assert_close(f.final, F.leaky_relu(pre[-1], 0.1) if arch == "wrn_28_2" else F.relu(pre[-1]))
    elif arch == "mobilenetv2":  # the reference ignores preact
        for p, q in zip(pre, post, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    else:
        pytest.fail(f"no preact relation written for {arch}")


@pytest.mark.parametrize("arch", PLAIN)
def test_preact_in_training_updates_batch_norm_once(arch: str):
    """RepDistiller's WRN re-applies BNs for preact, updating their running statistics twice."""
    torch.manual_seed(0)
    plain = build_model(arch, 10).train()
    with_preact = copy.deepcopy(plain)
    x = _x()
    a = plain(x, features=True)
    b = with_preact(x, features=True, preact=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    for (name, u), (_, v) in zip(plain.named_buffers(), with_preact.named_buffers(), strict=True):
        torch.testing.assert_close(v, u, rtol=0, atol=0, msg=name)
    # every kept map is still differentiable: nothing was overwritten in place after being saved
    sum(t.float().square().mean() for t in (*b.as_list(), *b.as_list(preact=True), b.logits)).backward()
    assert with_preact.classifier.weight.grad is not None


def test_preact_without_features_is_an_error():
    for arch in ("resnet8", "resnet8_aux"):
        with pytest.raises(ValueError, match="features=True"):
            build_model(arch, 10)(_x(), preact=True)


def test_aux_features_are_the_backbones():
    model = build_model("wrn_16_1_aux", 10).eval()
    x = _x()
    with torch.no_grad():
        f = model(x, features=True, preact=True)
        g = model.backbone(x, features=True, preact=True)
        logits, aux = model(x, detach_features=True)
    for a, b in zip((*f.as_list(), *f.as_list(preact=True)), (*g.as_list(), *g.as_list(preact=True)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(f.logits, logits, rtol=0, atol=0)
    assert len(aux) == 3


def _cifar_resnet50_parameters(num_classes: int) -> int:
    """RepDistiller resnetv2 ResNet50, counted from its description: 3x3 conv 3->64 + BN; stages of
    [3, 4, 6, 3] bottlenecks (1x1 in->p, 3x3 p->p, 1x1 p->4p, a BN after each; a 1x1 + BN
    projection in each stage's first block, where the width changes); linear 2048 -> classes."""
    total = 3 * 64 * 9 + 2 * 64
    in_planes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        out = 4 * planes
        for i in range(blocks):
            total += in_planes * planes + planes * planes * 9 + planes * out + 2 * (planes + planes + out)
            if i == 0:
                total += in_planes * out + 2 * out
            in_planes = out
    return total + 2048 * num_classes + num_classes


def test_resnet50_matches_repdistiller():
    model = build_model("resnet50", 100)
    assert count_parameters(model) == _cifar_resnet50_parameters(100) == 23_705_252
    keys = model.state_dict().keys()
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer4.0.downsample.1.running_var", "fc.weight"} <= keys
    assert "layer1.1.downsample.0.weight" not in keys and not any("shortcut" in k or "linear" in k for k in keys)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3
    conv = model.layer4[1].conv2  # 512 x 512 x 3 x 3: enough samples for a tight std estimate
    assert abs(conv.weight.std().item() / (2 / (512 * 9)) ** 0.5 - 1) < 0.02  # He normal, fan-out
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
