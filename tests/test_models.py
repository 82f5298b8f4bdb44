"""The model zoo: every arch builds and runs, reference parameter counts, the feature
interface, HSAKD auxiliary variants, checkpoint compatibility and the layer table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn

from engine.models import build_model, count_parameters, model_names
from engine.models.registry import MODELS, is_auxiliary
from engine.models.summary import layer_table

ROOT = Path(__file__).resolve().parent.parent
PLAIN = [a for a in model_names() if not is_auxiliary(a)]
AUX = [a for a in model_names() if is_auxiliary(a)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU forwards are far faster single-threaded on a shared 2-core box (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---- registry ---------------------------------------------------------------------------


def test_registry_and_package_import_stay_torch_free():
    code = "import sys, engine.models, engine.models.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_registry_names():
    expected = {f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)} | {"resnet8x4", "resnet32x4"}
    expected |= {"wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_2", "vgg8", "vgg11", "vgg13"}
    expected |= {"mobilenetv2", "shufflev1", "shufflev2", "resnet18", "resnet18_imagenet"}
    expected |= {f"{a}_aux" for a in ("wrn_40_2", "wrn_16_2", "resnet56", "resnet20", "resnet32x4", "resnet8x4")}
    assert expected <= set(model_names())
    assert model_names() == list(MODELS)
    assert all(":" in target for target in MODELS.values())


def test_unknown_arch_lists_known_names():
    with pytest.raises(KeyError, match="resnet20"):
        build_model("resnet21", 10)


def test_unsupported_option_is_a_clear_error():
    with pytest.raises(TypeError, match="pretrained"):
        build_model("resnet20", 10, pretrained=True)


# ---- every arch -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", PLAIN)
def test_plain_forward_and_feature_interface(arch: str):
    model = build_model(arch, 10).eval()
    x = _x()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        stages = model.stage_features(x)
    assert logits.shape == (2, 10)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == model.feature_dim and model.classifier.out_features == 10
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.classifier(feats), logits)
    assert len(stages) >= 4 and all(s.dim() == 4 for s in stages)
    torch.testing.assert_close(model.global_pool(stages[-1]), feats)


@pytest.mark.parametrize("arch", AUX)
def test_aux_forward_shapes(arch: str):
    model = build_model(arch, 10).eval()
    with torch.no_grad():
        logits, aux = model(_x())
    assert logits.shape == (2, 10)
    assert len(aux) == 3 and all(a.shape == (2, 40) for a in aux)


# ---- parameter counts -------------------------------------------------------------------

# RepDistiller / CRD, 100 classes
PLAIN_COUNTS = {
    "wrn_16_2": 703_284,
    "wrn_40_2": 2_255_156,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
}
# HSAKD (winycg/HSAKD), 100 classes: (total, backbone)
AUX_COUNTS = {
    "wrn_40_2_aux": (8_024_484, 2_255_156),
    "wrn_16_2_aux": (2_631_588, 703_284),
    "resnet56_aux": (3_067_684, 861_620),
    "resnet20_aux": (1_041_316, 278_324),
    "resnet32x4_aux": (26_340_916, 7_433_860),
    "resnet8x4_aux": (4_790_836, 1_233_540),
}


@pytest.mark.parametrize(("arch", "count"), PLAIN_COUNTS.items())
def test_plain_parameter_counts(arch: str, count: int):
    assert count_parameters(build_model(arch, 100)) == count


@pytest.mark.parametrize(("arch", "counts"), AUX_COUNTS.items())
def test_aux_parameter_counts(arch: str, counts: tuple[int, int]):
    model = build_model(arch, 100)
    assert (count_parameters(model), count_parameters(model.backbone)) == counts


def test_mixmatch_wrn_28_2_count():
    assert count_parameters(build_model("wrn_28_2", 10)) == 1_467_610


def test_count_parameters_trainable_only():
    model = build_model("resnet8", 10)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - (64 * 10 + 10)


# ---- HSAKD auxiliary variants -------------------------------------------------------------


@pytest.mark.parametrize(("plain", "aux"), [("resnet20", "resnet20_aux"), ("wrn_16_2", "wrn_16_2_aux")])
def test_plain_checkpoint_loads_into_aux_backbone(plain: str, aux: str):
    torch.manual_seed(0)
    source = build_model(plain, 100)
    source.train()
    with torch.no_grad():  # move BN running stats away from their init so they are checked too
        source(_x(8))
    source.eval()
    target = build_model(aux, 100).eval()
    target.backbone.load_state_dict(source.state_dict(), strict=True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], source(x), rtol=0, atol=0)


def test_aux_stage_features_shapes():
    model = build_model("resnet20", 10).eval()
    with torch.no_grad():
        f1, f2, f3, last = model.stage_features(_x())
    shapes = [tuple(f.shape) for f in (f1, f2, f3, last)]
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 64, 8, 8)]
    model = build_model("wrn_16_2", 10).eval()
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in model.stage_features(_x())]
    assert shapes == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 128, 8, 8)]


def test_detach_features_stops_branch_gradients_at_the_backbone():
    model = build_model("resnet8_aux", 10).train()
    _, aux = model(_x(), detach_features=True)
    sum(a.sum() for a in aux).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.auxiliary_classifier.parameters())
    model.zero_grad(set_to_none=True)
    _, aux = model(_x())
    sum(a.sum() for a in aux).backward()
    assert model.backbone.conv1.weight.grad is not None


def test_reference_checkpoint_key_names():
    """Keys follow RepDistiller / HSAKD / torchvision, so their published checkpoints load."""
    assert {"layer2.0.downsample.0.weight", "fc.weight"} <= build_model("resnet20", 100).state_dict().keys()
    assert {"block2.layer.0.convShortcut.weight", "bn1.running_mean", "fc.bias"} <= build_model(
        "wrn_16_2", 100
    ).state_dict().keys()
    aux_keys = build_model("wrn_16_2_aux", 100).state_dict().keys()
    assert {
        "backbone.fc.weight",
        "auxiliary_classifier.block_extractor1.0.layer.0.bn1.weight",
        "auxiliary_classifier.bn3.weight",
        "auxiliary_classifier.fc3.weight",
    } <= aux_keys
    assert "auxiliary_classifier.block_extractor1.1.0.conv1.weight" in build_model("resnet20_aux", 100).state_dict()
    assert {"linear.weight"} <= build_model("shufflev2", 100).state_dict().keys()


def test_mobilenetv2_accepts_repdistiller_classifier_keys():
    source = build_model("mobilenetv2", 100)
    state = source.state_dict()
    state["classifier.0.weight"] = state.pop("classifier.weight")
    state["classifier.0.bias"] = state.pop("classifier.bias")
    target = build_model("mobilenetv2", 100)
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(target.classifier.weight, source.classifier.weight)


# ---- resnet18 ---------------------------------------------------------------------------


def test_resnet18_cifar_stem_keeps_resolution():
    model = build_model("resnet18", 10).eval()
    with torch.no_grad():
        stages = model.stage_features(_x())
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)


def test_resnet18_imagenet_loads_local_weights_and_replaces_fc(tmp_path: Path):
    from torchvision.models import resnet18

    reference = resnet18()  # random weights standing in for the ImageNet file
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18_imagenet", 7, pretrained=str(path))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 7


def test_resnet18_imagenet_rejects_other_files(tmp_path: Path):
    path = tmp_path / "wrong.pth"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet18_imagenet", 10, pretrained=str(path))
    with pytest.raises(FileNotFoundError):
        build_model("resnet18_imagenet", 10, pretrained=str(tmp_path / "missing.pth"))


def test_resnet18_imagenet_offline_error_says_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch):
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"resnet18-f37072fd\.pth") as info:
        build_model("resnet18_imagenet", 10, pretrained=True)
    assert torch.hub.get_dir() in str(info.value)


# ---- summary ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet20", "wrn_16_2_aux", "mobilenetv2", "resnet18"])
def test_layer_table_sums_to_total(arch: str):
    model = build_model(arch, 10)
    model.train()
    rows, total = layer_table(model)
    assert total == count_parameters(model)
    assert sum(r["params"] for r in rows) == total
    assert all({"name", "type", "output_shape", "params"} <= r.keys() for r in rows)
    assert model.training  # mode restored after the dry run
    first = rows[0]
    assert first["type"] == "Conv2d" and first["output_shape"][0] == 1
