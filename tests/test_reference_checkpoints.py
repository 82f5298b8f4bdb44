"""Teachers and pretrained backbones saved by the reference code load as they are.

The reference networks (tests/reference_zoo.py) are RepDistiller's and HSAKD's, written from
their architecture descriptions independently of engine/models: the same parameter names and
shapes, the same computation. They are saved the way the reference programs save them, loaded
through the real code paths (Teacher, the frozen HSAKD backbone, kd / at students, linear_eval,
finetune), and must compute what the reference computes.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from engine.checkpoint import save_checkpoint
from engine.data import build_data
from engine.errors import CheckpointError
from engine.methods.registry import method_class
from engine.models import build_model, model_names
from engine.models.reference_layouts import LAYOUTS, to_kdtui_names
from engine.recipe import RecipeError, load_recipe
from engine.teacher import Teacher
from tests.conftest import write_recipe
from tests.reference_zoo import BN, REFERENCES

# ---------------------------------------------------------------- helpers


def randomized(arch: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A reference network in eval mode: He-normal convs (fan-in, so depthwise ones keep the signal alive),
    non-trivial BN affine parameters and statistics."""
    torch.manual_seed(seed)
    model = REFERENCES[arch](num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if isinstance(m, BN):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.01)
    return model.eval()


def sgd_state(model: nn.Module, stepped: bool) -> dict[str, Any]:
    """optimizer.state_dict() as the reference saves it; `stepped` fills the momentum buffers (on a copy)."""
    twin = copy.deepcopy(model).train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if stepped:
        out = twin(torch.randn(2, 3, 32, 32))
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        opt.step()
    return opt.state_dict()


FORMATS = ["repdistiller_epoch", "repdistiller_last", "hsakd_net", "state_dict", "bare", "data_parallel", "legacy"]


def save_as(kind: str, model: nn.Module, path: Path, stepped: bool = False) -> Path:
    """Write `model` as the reference programs do (RepDistiller train_teacher.py, HSAKD train_*_cifar.py)."""
    sd = model.state_dict()
    opt = argparse.Namespace(model="wrn_40_2", dataset="cifar100", learning_rate=0.05, lr_decay_epochs=[150, 180, 210],
                             trial="0", save_folder="./save/models/wrn_40_2_vanilla")
    obj: Any = {
        "repdistiller_epoch": lambda: {"epoch": 240, "model": sd, "accuracy": torch.tensor(75.61),
                                       "optimizer": sgd_state(model, stepped)},
        "repdistiller_last": lambda: {"opt": opt, "model": sd, "optimizer": sgd_state(model, stepped)},
        "hsakd_net": lambda: {"net": sd, "acc": 0.7561, "epoch": 239, "optimizer": sgd_state(model, stepped)},
        "state_dict": lambda: {"state_dict": sd},
        "bare": lambda: sd,
        "data_parallel": lambda: {"epoch": 240, "model": {f"module.{k}": v for k, v in sd.items()}},
        "legacy": lambda: {"epoch": 240, "model": sd, "accuracy": torch.tensor(75.61)},
    }[kind]()
    torch.save(obj, path, _use_new_zipfile_serialization=kind != "legacy")
    return path


def assert_same(got: Tensor, want: Tensor) -> None:
    """Equal up to float32 rounding: atol 1e-6 of the output's scale, and the output depends on its input."""
    scale = want.abs().max().item()
    assert scale > 0 and (want[0] - want[1]).abs().max().item() > 1e-3 * scale
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def data() -> Any:
    return build_data("embedded", "data", val_fraction=0.25, embedded_per_class=4)


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


COMMON = """
[data]
dataset = "embedded"
embedded_per_class = 4
val_fraction = 0.25
batch_size = 8
[model]
arch = "{arch}"
[train]
epochs = 1
threads = 1
"""


def method_from(tmp_path: Path, text: str, data: Any) -> Any:
    recipe = load_recipe(write_recipe(tmp_path, text, f"r{len(list(tmp_path.glob('r*.toml')))}.toml"))
    return method_class(recipe.run.method)(recipe, data, torch.device("cpu"))


# ---------------------------------------------------------------- names: every registry arch


def test_every_registry_arch_has_a_table_and_a_reference_here() -> None:
    assert set(model_names()) <= set(LAYOUTS), set(model_names()) - set(LAYOUTS)
    assert set(model_names()) <= set(REFERENCES), set(model_names()) - set(REFERENCES)


@pytest.mark.parametrize("arch", model_names())
def test_table_maps_the_reference_names_and_shapes_onto_kdtuis(arch: str) -> None:
    with torch.device("meta"):  # names and shapes only: nothing is allocated or initialised
        reference, kdtui = REFERENCES[arch](7).state_dict(), build_model(arch, 7).state_dict()
    mapped = to_kdtui_names({k: tuple(v.shape) for k, v in reference.items()}, arch)
    assert mapped == {k: tuple(v.shape) for k, v in kdtui.items()}


# ---------------------------------------------------------------- outputs: the real loading paths


@pytest.mark.parametrize(("arch", "kind"), [
    ("resnet50", "repdistiller_epoch"), ("mobilenetv2", "repdistiller_epoch"), ("wrn_40_2", "repdistiller_epoch"),
    ("resnet32x4", "repdistiller_last"), ("vgg13", "legacy"), ("resnet18", "data_parallel"),
    ("shufflev1", "repdistiller_epoch"), ("shufflev2", "bare"), ("resnet56", "hsakd_net")])
def test_a_reference_teacher_gives_the_references_logits(arch: str, kind: str, tmp_path: Path, data: Any,
                                                         x: Tensor) -> None:
    model = randomized(arch)
    teacher = Teacher(save_as(kind, model, tmp_path / "ckpt_epoch_240.pth"), data, torch.device("cpu"), arch=arch)
    with torch.no_grad():
        assert_same(teacher.logits(x), model(x))


@pytest.mark.parametrize("kind", FORMATS)
def test_every_save_format_loads(kind: str, tmp_path: Path, data: Any, x: Tensor) -> None:
    model = randomized("wrn_16_2", seed=2)
    teacher = Teacher(save_as(kind, model, tmp_path / "t.pth", stepped=True), data, torch.device("cpu"), "wrn_16_2")
    with torch.no_grad():
        assert_same(teacher.logits(x), model(x))


@pytest.mark.parametrize("arch", ["wrn_16_1_aux", "resnet8_aux"])
def test_an_hsakd_aux_teacher_gives_its_main_and_branch_logits(arch: str, tmp_path: Path, data: Any,
                                                               x: Tensor) -> None:
    model = randomized(arch)
    teacher = Teacher(save_as("hsakd_net", model, tmp_path / f"{arch}.pth.tar"), data, torch.device("cpu"), arch)
    main, branches = teacher.logits_and_aux(x)
    with torch.no_grad():
        want, want_branches = model(x)
    assert_same(main, want)
    assert len(branches) == 3 and [assert_same(a, b) for a, b in zip(branches, want_branches, strict=True)]


def test_a_changed_statistic_is_caught_at_that_tolerance(tmp_path: Path, data: Any, x: Tensor) -> None:
    """Control: the comparison sees one BN running variance off by 1%."""
    model = randomized("resnet8")
    sd = model.state_dict()
    sd["layer2.0.bn1.running_var"] = sd["layer2.0.bn1.running_var"] * 1.01
    torch.save({"model": sd}, tmp_path / "t.pth")
    teacher = Teacher(tmp_path / "t.pth", data, torch.device("cpu"), "resnet8")
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_same(teacher.logits(x), model(x))


def test_students_distill_from_a_reference_teacher(tmp_path: Path, data: Any, x: Tensor) -> None:
    """`[teacher] arch` reaches Teacher from kd (StudentMethod) and from a zoo method (FeatureDistill)."""
    model = randomized("wrn_40_2")
    path = save_as("repdistiller_last", model, tmp_path / "wrn_40_2_last.pth")
    teacher = f'[teacher]\ncheckpoint = "{path}"\narch = "wrn_40_2"\n'
    for method in ("kd", "at"):
        loaded = method_from(tmp_path, COMMON.format(arch="wrn_16_1") + f'[run]\nmethod = "{method}"\n' + teacher, data)
        with torch.no_grad():
            assert_same(loaded.teacher.logits(x), model(x))


@pytest.mark.parametrize(("method", "arch", "source", "kind"), [
    ("linear_eval", "mobilenetv2", "mobilenetv2", "repdistiller_epoch"),
    ("finetune", "resnet32x4", "resnet32x4", "repdistiller_last"),
    ("finetune", "resnet18", "resnet18", "repdistiller_epoch"),
    ("linear_eval", "wrn_16_1", "wrn_16_1_aux", "hsakd_net")])  # the backbone of an HSAKD teacher
def test_a_reference_backbone_feeds_linear_eval_and_finetune(method: str, arch: str, source: str, kind: str,
                                                             tmp_path: Path, data: Any, x: Tensor) -> None:
    model = randomized(source, num_classes=100)  # another head than the target's: left out
    path = save_as(kind, model, tmp_path / "backbone.pth")
    loaded = method_from(tmp_path, COMMON.format(arch=arch) + f'[run]\nmethod = "{method}"\n'
                         f'[teacher]\ncheckpoint = "{path}"\narch = "{source}"\n', data).model.eval()
    reference = model.backbone if source.endswith("_aux") else model
    with torch.no_grad():
        assert_same(loaded.forward_features(x), reference.pooled(x))
    assert loaded.classifier.out_features == 10


def test_a_frozen_hsakd_teacher_starts_from_a_reference_backbone(tmp_path: Path, data: Any, x: Tensor) -> None:
    model = randomized("wrn_16_1")
    path = save_as("state_dict", model, tmp_path / "wrn_16_1.pth")  # HSAKD's --pretrained-backbone file
    method = method_from(tmp_path, COMMON.format(arch="wrn_16_1_aux") + '[run]\nmethod = "hsakd_teacher"\n'
                         f'[teacher]\ncheckpoint = "{path}"\narch = "wrn_16_1"\n'
                         "[teacher_training]\nfreeze_backbone = true\n", data)
    with torch.no_grad():
        assert_same(method.model.backbone.eval()(x), model(x))


# ---------------------------------------------------------------- bad input: one line


def one_line(caught: pytest.ExceptionInfo, path: Path, *needles: str) -> None:
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and all(n in text for n in needles), text


def test_a_reference_file_without_teacher_arch_is_one_line(tmp_path: Path, data: Any) -> None:
    path = save_as("repdistiller_epoch", randomized("resnet8"), tmp_path / "ckpt_epoch_240.pth")
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"))
    one_line(caught, path, "not a kdtui checkpoint", "[teacher] arch")
    with pytest.raises(CheckpointError) as caught:
        method_from(tmp_path, COMMON.format(arch="resnet8") + f'[run]\nmethod = "linear_eval"\n'
                    f'[teacher]\ncheckpoint = "{path}"\n', data)
    one_line(caught, path, "[teacher] arch")


def test_unknown_layouts_name_the_keys_that_did_not_fit(tmp_path: Path, data: Any) -> None:
    path = save_as("repdistiller_epoch", randomized("shufflev1"), tmp_path / "s.pth")
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"), "resnet8")
    one_line(caught, path, "do not fit arch 'resnet8'", "missing", "'layer2.0.downsample.0.weight'", "unexpected",
             "'layer1.0.conv3.weight'")
    path = save_as("bare", randomized("resnet32x4"), tmp_path / "r.pth")
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"), "resnet8x4")
    one_line(caught, path, "unexpected", "'layer1.1.conv1.weight'")
    path = save_as("bare", randomized("resnet8x4"), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"), "resnet8")
    one_line(caught, path, "of another shape (file vs arch)", "conv1.weight (32, 3, 3, 3) vs (16, 3, 3, 3)")


def test_a_teacher_of_other_classes_is_one_line(tmp_path: Path, data: Any) -> None:
    path = save_as("repdistiller_epoch", randomized("resnet8", num_classes=100), tmp_path / "c100.pth")
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"), "resnet8")
    one_line(caught, path, "100 classes", "fc.weight", "embedded (10 classes)")


def test_files_without_a_state_dict_or_with_code_are_refused(tmp_path: Path, data: Any) -> None:
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return os.system, (f"touch {marker}",)

    sd = randomized("resnet8").state_dict()
    files = {"no-weights.pth": ({"epoch": 3, "acc": 0.5}, "no state dict found"),
             "exploit.pth": ({"model": sd, "opt": Exploit()}, "refused to load"),
             "in-namespace.pth": ({"model": sd, "opt": argparse.Namespace(hook=Exploit())}, "refused to load"),
             "whole-module.pth": (randomized("resnet8"), "refused to load")}
    files["exploit-legacy.pth"] = files["exploit.pth"]  # the pre-1.6 format, which reference files may have
    for name, (obj, words) in files.items():
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization="legacy" not in name)
        with pytest.raises(CheckpointError) as caught:
            Teacher(tmp_path / name, data, torch.device("cpu"), "resnet8")
        one_line(caught, tmp_path / name, words)
    assert not marker.exists()
    assert torch.serialization.get_safe_globals().count(argparse.Namespace) == 0  # allowed only while loading


def test_kdtui_checkpoints_need_no_arch_and_refuse_a_different_one(tmp_path: Path, data: Any, x: Tensor) -> None:
    model = build_model("resnet8", 10).eval()
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "arch": "resnet8", "num_classes": 10, "dataset": "embedded",
                     "class_names": list(data.class_names)}, path)
    for arch in (None, "resnet8"):
        with torch.no_grad():
            assert torch.equal(Teacher(path, data, torch.device("cpu"), arch).logits(x), model(x))
    with pytest.raises(CheckpointError) as caught:
        Teacher(path, data, torch.device("cpu"), "resnet20")
    one_line(caught, path, "holds a 'resnet8'", "[teacher] arch = 'resnet20'")


def test_teacher_arch_is_checked_against_the_registry(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"teacher\.arch: unknown arch 'wrn_40_3'"):
        load_recipe(write_recipe(tmp_path, COMMON.format(arch="resnet8") + '[teacher]\narch = "wrn_40_3"\n'))
