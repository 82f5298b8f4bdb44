"""The SSL zoo through the real launcher and trainer (tiny settings): every method trains, evaluates its
kNN and probe, and feeds linear_eval; targets move only by the EMA; the probe never reaches the
backbone; MoCo's queue; DINO's frozen prototypes and centre; exact resume (BYOL's target, MoCo's queue)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.data import build_data
from engine.errors import CheckpointError
from engine.evaluate import evaluate_checkpoint
from engine.methods.linear_eval import LinearEval
from engine.methods.registry import method_class
from engine.methods.ssl_zoo_losses import cosine_momentum, target_entropy
from engine.recipe import RecipeError, load_recipe
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, Trainer, train
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare

COMMON = """
[data]
dataset = "embedded"
embedded_per_class = 8
image_size = 16
val_fraction = 0.25
batch_size = 16
eval_batch_size = 500
[model]
arch = "resnet8"
[optim]
lr = 0.05
[schedule]
name = "cosine"
per = "step"
[train]
epochs = 2
max_steps_per_epoch = 2
threads = 1
log_every = 1
"""
TINY = {  # small heads; queue of 40 rows wraps after 3 steps of 16 keys
    "byol": "[ssl.byol]\nproj_hidden_dim = 32\nproj_dim = 16\npred_hidden_dim = 32\n",
    "simsiam": "[ssl.simsiam]\nproj_hidden_dim = 32\nproj_dim = 16\npred_hidden_dim = 8\n",
    "moco": "[ssl.moco]\nproj_hidden_dim = 32\nproj_dim = 16\nqueue_size = 40\n",
    "barlow_twins": "[ssl.barlow_twins]\nproj_hidden_dim = 32\nproj_dim = 16\n",
    "vicreg": "[ssl.vicreg]\nproj_hidden_dim = 32\nproj_dim = 16\n",
    "dino": "[ssl.dino]\nproj_hidden_dim = 32\nproj_dim = 16\nnum_prototypes = 64\n",
}
TARGETS = {"byol": ["target"], "moco": ["target", "queue"], "dino": ["target", "center"]}


def recipe_text(method: str, extra: str = "") -> str:
    return f'[run]\nname = "tiny-{method}"\nmethod = "{method}"\n' + COMMON + "[ssl]\nprobe_lr = 0.02\n" + extra + \
        TINY[method]


def launch(recipe: Path, runs_dir: Path) -> RunDir:
    run = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    assert train(run.path) == EXIT_FINISHED, run.read_info().get("error")
    return run


def build(tmp_path: Path, method: str, extra: str = "", optim: str = "") -> object:
    recipe = load_recipe(write_recipe(tmp_path, recipe_text(method, extra) + optim, f"{method}.toml"))
    data = build_data("embedded", "data", val_fraction=0.25, embedded_per_class=8, image_size=16)
    return method_class(method)(recipe, data, torch.device("cpu"))


@pytest.mark.parametrize("method", list(TINY))
def test_each_method_trains_evaluates_and_feeds_linear_eval(method: str, tmp_path: Path, runs_dir: Path) -> None:
    extra = "local_crops = 2\n" if method == "dino" else ""  # DINO also exercises multi-crop
    run = launch(write_recipe(tmp_path, recipe_text(method, extra), "pre.toml"), runs_dir)
    steps = [e for e in run.events() if e.get("kind") == "step"]
    assert len(steps) == 4 and all({"loss", "loss_ssl", "loss_probe", "top1", "lr"} <= e.keys() for e in steps)
    assert all(e["loss"] == pytest.approx(e["loss_ssl"] + e["loss_probe"], rel=1e-5) for e in steps)
    val = [e for e in run.events() if e["split"] == "val"][-1]
    assert {"loss", "loss_ssl", "loss_probe", "knn_top1", "linear_top1"} <= val.keys()
    assert 0 <= val["knn_top1"] <= 1 and 0 <= val["linear_top1"] <= 1
    assert run.read_info()["best"]["metric"] == "val.knn_top1"
    state = load_checkpoint(run.checkpoints / "best.pt")
    assert list(state["modules"]) == ["model", *TARGETS.get(method, [])]
    assert {"backbone", "projector"} <= {k.split(".")[0] for k in state["model"]}
    with pytest.raises(CheckpointError):  # no class head to evaluate: a one-line error
        evaluate_checkpoint(run.checkpoints / "best.pt")

    linear = load_recipe(write_recipe(tmp_path, COMMON +
                                      f'[run]\nmethod = "linear_eval"\n[teacher]\ncheckpoint = '
                                      f'"{run.checkpoints / "best.pt"}"\n', "lin.toml"))
    model = LinearEval(linear, build_data("embedded", "data", val_fraction=0.25, embedded_per_class=8,
                                          image_size=16), torch.device("cpu")).model
    backbone = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert all(torch.equal(v, backbone[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))


def test_probe_has_its_own_group_and_sends_no_gradient_into_the_backbone(tmp_path: Path) -> None:
    method = build(tmp_path, "barlow_twins")
    groups = method.parameter_groups()
    probe = {id(p) for p in method.probe.parameters()}
    assert {id(p) for p in groups[1]["params"]} == probe and groups[1]["lr"] == 0.02
    assert groups[1]["weight_decay"] == 0.0 and not probe & {id(p) for p in groups[0]["params"]}
    images, labels, _ = next(method.data.train.batches(16, shuffle=False, drop_last=True))
    method.ssl_loss = lambda views, feats, training: {"loss": sum(f.sum() for f in feats) * 0.0}
    out = method.train_step(images, labels, torch.Generator().manual_seed(0))
    out["loss"].backward()  # = 0 * features + probe cross-entropy on detached features
    assert float(method.probe.weight.grad.abs().sum()) > 0
    for name, p in method.model.backbone.named_parameters():
        if id(p) not in probe:
            assert p.grad is None or not p.grad.any(), name


def test_byol_target_gets_no_gradient_and_moves_exactly_by_the_scheduled_ema(tmp_path: Path) -> None:
    method = build(tmp_path, "byol")
    target = dict(method.target.named_parameters())
    assert not any(p.requires_grad for p in target.values())
    in_optimizer = {id(p) for g in method.parameter_groups() for p in g["params"]}
    assert not in_optimizer & {id(p) for p in target.values()}
    optimizer = torch.optim.SGD(method.parameter_groups(), lr=0.5, momentum=0.9)
    images, labels, _ = next(method.data.train.batches(16, shuffle=False, drop_last=True))
    method.train_mode()
    assert method.total_steps == 4
    for step in (1, 2, 3):
        before = {k: v.detach().clone() for k, v in target.items()}
        out = method.train_step(images, labels, torch.Generator().manual_seed(step))
        assert float(out["tau"]) == pytest.approx(cosine_momentum(step - 1, 4, 0.99))
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in target.values())
        optimizer.step()
        method.after_optimizer_step(step)
        tau = cosine_momentum(step - 1, 4, 0.99, 1.0)
        online = dict(method.model.named_parameters())
        for name, value in target.items():
            if name.startswith("backbone.fc."):  # the probe's copy: unused by the target, never updated
                assert torch.equal(value, before[name])
            else:
                new = online[name].detach()
                assert torch.equal(value, before[name].mul(tau).add(new, alpha=1 - tau)), name  # bit for bit
                assert torch.allclose(value, tau * before[name] + (1 - tau) * new, rtol=0, atol=1e-6)
    assert not torch.equal(target["projector.0.weight"], online["projector.0.weight"])


def test_moco_enqueues_this_steps_keys_and_wraps_its_pointer(tmp_path: Path) -> None:
    method = build(tmp_path, "moco")
    images, labels, _ = next(method.data.train.batches(16, shuffle=False, drop_last=True))
    method.train_mode()
    for step in range(3):  # 16 keys a step into 40 rows: pointer 16, 32, then 48 % 40 = 8
        old = method.queue.keys.clone()
        views = method.views(images, torch.Generator().manual_seed(step))
        with torch.no_grad():
            keys = [torch.nn.functional.normalize(method.target.projector(method.target(v)), dim=-1) for v in views]
        method.train_step(images, labels, torch.Generator().manual_seed(step))
        rows = (torch.arange(16) + 16 * step) % 40
        for v in range(2):
            assert torch.allclose(method.queue.keys[v, rows], keys[v], atol=1e-6)
            untouched = torch.ones(40, dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(method.queue.keys[v, untouched], old[v, untouched])
        assert int(method.queue.pointer) == (16 * (step + 1)) % 40


def test_dino_freezes_the_prototypes_in_epoch_one_and_centres_by_the_ema(tmp_path: Path) -> None:
    method = build(tmp_path, "dino")
    images, labels, _ = next(method.data.train.batches(16, shuffle=False, drop_last=True))
    for epoch, frozen in ((1, True), (2, False)):
        method.epoch = epoch
        method.train_mode()
        method.model.zero_grad(set_to_none=True)
        centre = method.center.center.clone()
        views = method.views(images, torch.Generator().manual_seed(epoch))
        with torch.no_grad():
            teacher = torch.cat([method.target.projector(method.target(v)) for v in views[:2]])
        out = method.train_step(images, labels, torch.Generator().manual_seed(epoch))
        out["loss"].backward()
        assert (method.model.projector.prototypes.grad is None) == frozen
        assert torch.allclose(method.center.center, 0.9 * centre + 0.1 * teacher.mean(dim=0), atol=1e-6)
        q = torch.softmax((teacher - centre) / method.teacher_temp(), dim=-1)
        by_hand = -(q * q.log()).sum(dim=-1).mean() / math.log(q.shape[1])
        assert float(out["target_entropy"]) == pytest.approx(float(by_hand), abs=1e-6)


def test_dino_target_entropy_reads_1_when_uniform_and_0_when_one_hot() -> None:
    centre = torch.zeros(1, 8)
    assert float(target_entropy([torch.zeros(4, 8)], centre, 0.07)) == pytest.approx(1.0)
    peaked = torch.full((4, 8), -1.0)
    peaked[:, 3] = 1.0
    assert float(target_entropy([peaked], centre, 0.01)) == pytest.approx(0.0, abs=1e-6)


def _stop_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer._step

    def stop(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step == step:
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", stop)


@pytest.mark.parametrize("method", ["byol", "moco"])
def test_resume_after_an_interrupt_is_bit_identical(method: str, tmp_path: Path, runs_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    optim = '[optim]\nname = "lars"\nlr = 0.3\nweight_decay = 1e-4\n' if method == "byol" else ""
    text = recipe_text(method).replace("[optim]\nlr = 0.05\n", optim or "[optim]\nlr = 0.05\n")
    recipe = write_recipe(tmp_path, text.replace("max_steps_per_epoch = 2", "max_steps_per_epoch = 3"))
    reference = launch(recipe, runs_dir)
    stopped = create_runs(prepare(recipe, None, runs_dir), runs_dir)[0]
    _stop_at(4, monkeypatch)  # mid-epoch 2
    assert train(stopped.path) == 130
    monkeypatch.undo()
    assert train(stopped.path, resume=True) == EXIT_FINISHED
    a, b = (load_checkpoint(r.checkpoints / "last.pt") for r in (reference, stopped))
    for name in ("model", *TARGETS[method]):
        for key, value in a["modules"][name].items():
            assert torch.equal(value, b["modules"][name][key]), f"{name}.{key}"
    if method == "moco":  # 6 steps of 16 keys in 40 rows: the pointer wrapped twice
        assert int(b["modules"]["queue"]["pointer"]) == 96 % 40


def test_view_presets_overrides_and_local_crops(tmp_path: Path) -> None:
    extra = ("local_crops = 2\nlocal_crop_size = 8\n[ssl.every_view]\ncrop_scale = [0.3, 1.0]\n"
             "[[ssl.per_view]]\nsolarize_p = 0.5\n")
    method = build(tmp_path, "dino", extra=extra)
    from engine.data.views import VIEW_PRESETS

    preset = VIEW_PRESETS["dino"]
    assert [s.crop_scale for s in method.specs] == [(0.3, 1.0), (0.3, 1.0), (0.05, 0.4), (0.05, 0.4)]
    assert method.specs[0].solarize_p == 0.5 and method.specs[1].solarize_p == preset[1].solarize_p
    assert [s.size for s in method.specs] == [None, None, 8, 8]
    views = method.views(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    with pytest.raises(RecipeError, match="unknown preset"):
        build(tmp_path, "byol", extra='views = "nope"\n')


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[run]\nmethod = "byol"\n[ssl]\nproj_dim = 64\n', "ssl.proj_dim", "ssl.byol.*"),
        ('[run]\nmethod = "vicreg"\n[ssl]\ncrop_scale = [0.2, 1.0]\n', "ssl.crop_scale", "ssl.every_view.crop_scale"),
        ('[run]\nmethod = "simclr"\n[ssl]\nviews = "byol"\n', "ssl.views", "only the SSL zoo"),
        ('[run]\nmethod = "moco"\n[ssl.byol]\nproj_dim = 64\n', "ssl.byol", "does not use it"),
        ('[run]\nmethod = "byol"\n[ssl]\nlocal_crops = 2\n', "ssl.local_crops", "only dino"),
        ('[run]\nmethod = "moco"\n[ssl.moco]\nqueue_size = 8\n', "ssl.moco.queue_size", "less than one batch"),
        ('[run]\nmethod = "dino"\n[ssl.dino]\nbase_tau = 0.9\nfinal_tau = 0.5\n', "ssl.dino.base_tau", "only rises"),
        ('[run]\nmethod = "byol"\n[ssl.every_view]\ncrop_scale = [0.5, 0.2]\n', "ssl.every_view.crop_scale",
         "0 < min <= max <= 1"),
        ('[run]\nmethod = "barlow_twins"\n[model]\narch = "resnet8_aux"\n', "model.arch", "plain architecture"),
        ('[optim]\nname = "lamb"\n', "optim.name", "lars"),
    ],
)
def test_bad_zoo_recipes_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, text))
    assert info.value.key == key and fragment in str(info.value) and "\n" not in str(info.value)


def test_shipped_zoo_recipes_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "recipes" / "ssl"
    for method in TINY:
        recipe = load_recipe(root / f"{method}_resnet18_cifar10.toml")
        assert recipe.run.method == method and recipe.model.arch == "resnet18" and recipe.train.epochs == 1000
        assert recipe.data.batch_size == 256 and recipe.checkpoint.best_metric == "val.knn_top1"
    for dataset in ("cifar10", "cifar100"):
        recipe = load_recipe(root / f"linear_eval_{dataset}.toml",
                             [f"teacher.from={root / 'byol_resnet18_cifar10.toml'}"])
        assert recipe.data.dataset == dataset and recipe.linear_eval.layers == 2 and recipe.data.batch_size == 32
        assert recipe.teacher.from_recipe == str(root / "byol_resnet18_cifar10.toml")
