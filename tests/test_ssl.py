"""SimCLR, RotNet, linear evaluation and fine-tuning through the real launcher and trainer (tiny settings)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data import build_data
from engine.errors import CheckpointError
from engine.evaluate import evaluate_checkpoint
from engine.methods.finetune import FineTune
from engine.methods.linear_eval import LinearEval
from engine.methods.rotnet import RotNet
from engine.recipe import RecipeError, load_recipe
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, Trainer, train
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare

COMMON = """
[data]
dataset = "embedded"
embedded_per_class = 8
val_fraction = 0.25
batch_size = 16
eval_batch_size = 500
[model]
arch = "resnet8"
[train]
epochs = 1
threads = 1
log_every = 1
"""
SIMCLR = ('[run]\nname = "tiny-simclr"\nmethod = "simclr"\n[optim]\nlr = 0.3\n'
          "[ssl]\nproj_hidden_dim = 32\nproj_dim = 16\n")
LINEAR = """[run]
name = "tiny-linear"
method = "linear_eval"
[teacher]
from = "simclr.toml"
[optim]
lr = 0.05
[linear_eval]
layers = 2
hidden_dim = 8
"""


def launch(recipe: Path, runs_dir: Path, overrides: list[str] | None = None) -> RunDir:
    run = create_runs(prepare(recipe, overrides, runs_dir), runs_dir)[0]
    assert train(run.path) == EXIT_FINISHED, run.read_info().get("error")
    return run


def tiny_data() -> object:
    return build_data("embedded", "data", val_fraction=0.25, embedded_per_class=8)


def test_simclr_then_linear_eval_through_the_launcher(tmp_path: Path, runs_dir: Path) -> None:
    simclr_recipe = write_recipe(tmp_path, SIMCLR + COMMON, "simclr.toml")
    simclr = launch(simclr_recipe, runs_dir)
    steps = [e for e in simclr.events() if e.get("kind") == "step"]
    assert len(steps) == 3 and all({"loss", "pos_top1", "lr"} <= e.keys() for e in steps)  # 60 images // 16
    val = [e for e in simclr.events() if e["split"] == "val"][-1]
    assert val["loss"] > 0 and 0 <= val["knn_top1"] <= 1
    assert simclr.read_info()["best"]["metric"] == "val.knn_top1"
    pretrained = load_checkpoint(simclr.checkpoints / "best.pt")
    assert {k.split(".")[0] for k in pretrained["model"]} == {"backbone", "head"}
    with pytest.raises(CheckpointError):  # a one-line error, not a traceback: there is no class head
        evaluate_checkpoint(simclr.checkpoints / "best.pt")

    linear_recipe = write_recipe(tmp_path, LINEAR + COMMON.replace("epochs = 1", "epochs = 2"), "linear.toml")
    linear = launch(linear_recipe, runs_dir)
    assert load_recipe(linear.recipe_path).teacher.checkpoint == str(simclr.checkpoints / "best.pt")
    state = load_checkpoint(linear.checkpoints / "last.pt")
    backbone = {k.removeprefix("backbone."): v for k, v in pretrained["model"].items() if k.startswith("backbone.")}
    # six real optimizer steps later, every backbone tensor (BN running stats included) is bit-identical
    for key, value in state["model"].items():
        if not key.startswith("fc."):
            assert torch.equal(value, backbone[key]), key
    assert any(k.startswith("bn") or "running_mean" in k for k in state["model"])
    assert not torch.equal(state["model"]["fc.weight"], backbone["fc.weight"])
    # the model's classifier is the folded two-layer head: `kdtui eval` reproduces the logged accuracy
    head = state["modules"]["head"]
    assert torch.allclose(state["model"]["fc.weight"], head["1.weight"] @ head["0.weight"], atol=1e-6)
    logged = [e for e in linear.events() if e["split"] == "test"]
    assert [e["epoch"] for e in logged] == [1, 2]
    assert evaluate_checkpoint(linear.checkpoints / "last.pt")["top1"] == pytest.approx(logged[-1]["top1"])
    train_epochs = [e for e in linear.events() if e.get("kind") == "epoch"]
    assert [e["epoch"] for e in train_epochs] == [1, 2] and all({"loss", "top1"} <= e.keys() for e in train_epochs)

    # fine-tuning from the same run: its backbone, a fresh classifier of the target size
    finetune = load_recipe(write_recipe(tmp_path, COMMON.replace("arch", 'num_classes = 5\narch') +
                                        f'[run]\nmethod = "finetune"\n[teacher]\ncheckpoint = '
                                        f'"{simclr.checkpoints / "best.pt"}"\n', "ft.toml"))
    model = FineTune(finetune, tiny_data(), torch.device("cpu")).model
    assert torch.equal(model.conv1.weight, backbone["conv1.weight"]) and model.fc.out_features == 5

    runner = CliRunner()
    from tui.cli import app

    result = runner.invoke(app, ["eval", str(simclr.checkpoints / "best.pt")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_linear_eval_trains_only_the_head_and_never_moves_batch_norm(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, COMMON + '[run]\nmethod = "linear_eval"\n'
                                      "[linear_eval]\nrandom_backbone = true\n"))
    method = LinearEval(recipe, tiny_data(), torch.device("cpu"))
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.5, momentum=0.9)
    assert {id(p) for p in method.parameter_groups()} == {id(method.model.fc.weight), id(method.model.fc.bias)}
    generator = torch.Generator().manual_seed(0)
    for images, labels, _ in method.data.train.batches(16, shuffle=True, drop_last=False, generator=generator):
        method.train_mode()
        assert not method.model.training
        loss = method.train_step(images, labels, generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = method.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["fc.weight", "fc.bias"]


def test_two_layer_head_folds_into_the_classifier_and_cache_matches_recompute(tmp_path: Path,
                                                                               runs_dir: Path) -> None:
    text = COMMON.replace("[data]\n", '[data]\naugment = "none"\n') + (
        '[run]\nmethod = "linear_eval"\n[linear_eval]\nrandom_backbone = true\nlayers = 2\nhidden_dim = 8\n')
    recomputed = launch(write_recipe(tmp_path, text, "plain.toml"), runs_dir)
    cached = launch(write_recipe(tmp_path, text + "precompute = true\n", "cached.toml"), runs_dir)
    a, b = (load_checkpoint(r.checkpoints / "last.pt")["model"] for r in (recomputed, cached))
    assert all(len([e for e in r.events() if e.get("kind") == "step"]) == 4 for r in (recomputed, cached))
    # cached features looked up by content train the same head as recomputing them every step
    assert torch.allclose(a["fc.weight"], b["fc.weight"], atol=1e-5)

    recipe = load_recipe(cached.recipe_path)
    method = LinearEval(recipe, tiny_data(), torch.device("cpu"))
    with torch.no_grad():
        for p in method.head.parameters():
            p.normal_()
        method.fold_head()
        x = torch.randn(4, 3, 32, 32)
        assert torch.allclose(method.model(x), method.head(method.model.forward_features(x)), atol=1e-4)


def test_rotnet_learns_rotations_and_its_backbone_feeds_linear_eval(tmp_path: Path) -> None:
    """Direct on the method (the trainer path is the one SimCLR takes above): rotating the
    1,000-image test split four times would dominate this file's run time on 2 cores."""
    torch.manual_seed(0)
    data = tiny_data()
    no_augment = COMMON.replace("[data]\n", '[data]\naugment = "none"\n')
    recipe = load_recipe(write_recipe(tmp_path, no_augment + '[run]\nmethod = "rotnet"\n'))
    rotnet = RotNet(recipe, data, torch.device("cpu"))
    images, _, _ = next(data.train.batches(6, shuffle=False, drop_last=True))
    logits, rotations = rotnet.rotation_logits(images.float())
    assert logits.shape == (24, 4) and rotations.tolist() == [0, 1, 2, 3] * 6
    optimizer = torch.optim.SGD(rotnet.parameter_groups(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):  # the same 24 rows every step: the rotation loss must go down
        out = rotnet.train_step(images, torch.zeros(6), generator)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] and 0 <= float(out["rot_top1"]) <= 1
    metrics = rotnet.evaluate(data.val, 64)
    assert set(metrics) == {"loss", "rot_top1", "knn_top1"} and rotnet.model.training

    checkpoint = tmp_path / "rotnet.pt"
    save_checkpoint({"model": rotnet.model.state_dict(), "arch": "resnet8"}, checkpoint)
    recipe = load_recipe(write_recipe(tmp_path, COMMON + f'[run]\nmethod = "linear_eval"\n[teacher]\ncheckpoint = '
                                      f'"{checkpoint}"\n', "lin.toml"))
    model = LinearEval(recipe, data, torch.device("cpu")).model
    assert torch.equal(model.conv1.weight, rotnet.model.conv1.weight) and model.fc.out_features == 10
    wrong = load_recipe(write_recipe(tmp_path, COMMON.replace("resnet8", "resnet14") + '[run]\nmethod = "linear_eval"\n'
                                     f'[teacher]\ncheckpoint = "{checkpoint}"\n', "wrong.toml"))
    with pytest.raises(CheckpointError, match=r"model\.arch"):
        LinearEval(wrong, data, torch.device("cpu"))


def test_finetune_stages_switch_learning_rate_where_the_recipe_says(tmp_path: Path, runs_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import resnet18

    weights = tmp_path / "imagenet_resnet18.pt"
    torch.manual_seed(7)
    torch.save(resnet18().state_dict(), weights)  # stands in for the ImageNet download (offline)
    text = COMMON.replace('arch = "resnet8"', f'arch = "resnet18_imagenet"\npretrained = "{weights}"').replace(
        "val_fraction = 0.25", "val_fraction = 0.0") + """
[run]
method = "finetune"
[optim]
lr = 0.01
[schedule]
name = "stages"
[[schedule.stages]]
epochs = 2
lr = 0.01
schedule = "cosine"
period = 50
[[schedule.stages]]
epochs = 1
lr = 0.001
schedule = "cosine"
period = 50
"""
    path = write_recipe(tmp_path, text, "ft.toml")
    recipe = load_recipe(path, ["train.epochs=3", "train.max_steps_per_epoch=2", "train.eval_every=3"])
    model = FineTune(recipe, tiny_data(), torch.device("cpu")).model
    assert torch.equal(model.conv1.weight, torch.load(weights)["conv1.weight"]) and model.fc.out_features == 10

    used: list[float] = []
    original = Trainer._step

    def record_lr(self: Trainer, *args: object) -> dict:
        used.append(self.optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", record_lr)
    launch(path, runs_dir, ["train.epochs=3", "train.max_steps_per_epoch=2", "train.eval_every=3"])
    epoch1 = 0.01 * 0.5 * (1 + math.cos(math.pi / 50))
    assert used == pytest.approx([0.01, 0.01, epoch1, epoch1, 0.001, 0.001], rel=1e-9)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[run]\nmethod = "linear_eval"\n', "teacher", "needs a pretrained backbone"),
        ('[run]\nmethod = "linear_eval"\n[linear_eval]\nrandom_backbone = true\nprecompute = true\n',
         "linear_eval.precompute", 'data.augment = "none"'),
        ('[run]\nmethod = "finetune"\n', "model.pretrained", "needs starting weights"),
        ('[run]\nmethod = "rotnet"\n[model]\nnum_classes = 10\n', "model.num_classes", "4 rotations"),
        ('[run]\nmethod = "simclr"\n[model]\narch = "resnet8_aux"\n', "model.arch", "plain architecture"),
        ('[run]\nmethod = "simclr"\n[ssl]\ncrop_scale = [0.5, 0.2]\n', "ssl.crop_scale", "0 < min <= max <= 1"),
        ('[run]\nmethod = "mixmatch"\n[semi]\nema_decay = 1.0\n', "semi.ema_decay", "less than 1"),
        ('[schedule]\nname = "stages"\n', "schedule.stages", "at least one"),
    ],
)
def test_bad_ssl_recipes_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, text))
    assert info.value.key == key and fragment in str(info.value) and "\n" not in str(info.value)


def test_ssl_defaults_pick_best_by_knn(tmp_path: Path) -> None:
    assert load_recipe(write_recipe(tmp_path, '[run]\nmethod = "simclr"\n')).checkpoint.best_metric == "val.knn_top1"
    explicit = '[run]\nmethod = "rotnet"\n[checkpoint]\nbest_metric = "val.rot_top1"\n'
    assert load_recipe(write_recipe(tmp_path, explicit)).checkpoint.best_metric == "val.rot_top1"
