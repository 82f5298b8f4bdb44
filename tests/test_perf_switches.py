"""Speed switches through the real trainer on CPU: precision, channels_last, compile, and the
distillation teacher (inference mode, caller's precision, no gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data.embedded import CLASS_NAMES
from engine.models import build_model
from engine.models.base import Features
from engine.trainer import EXIT_FINISHED, Trainer
from tests.conftest import write_recipe
from tui.launcher import create_runs, prepare

RECIPE = """
[run]
method = "{method}"
[data]
dataset = "embedded"
batch_size = 16
eval_batch_size = 64
val_fraction = 0.2
embedded_per_class = 4
image_size = 16
[model]
arch = "{arch}"
[optim]
lr = 0.05
[schedule]
name = "constant"
[train]
epochs = 1
seed = 5
threads = 1
max_steps_per_epoch = 2
{train}
"""


def trainer(tmp_path: Path, train: str = "", method: str = "supervised", arch: str = "resnet8", extra: str = "",
            name: str = "r") -> Trainer:
    text = RECIPE.format(method=method, arch=arch, train=train) + extra
    recipe = write_recipe(tmp_path, text, f"{name}.toml")
    runs = tmp_path / f"runs-{name}"
    return Trainer(create_runs(prepare(recipe, None, runs), runs)[0])


def one_step(t: Trainer) -> dict[str, torch.Tensor]:
    images, labels, indices = next(t.data.train.batches(16, shuffle=False, drop_last=False, device="cpu"))
    t.aug_gen = torch.Generator().manual_seed(0)
    t.method.train_mode()
    return t._step(images, labels, indices, t.aug_gen)


def assert_loads_into_plain_model(t: Trainer, arch: str = "resnet8") -> None:
    state = load_checkpoint(t.run.checkpoints / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in state["model"]), list(state["model"])[:3]
    plain = build_model(arch, 10)
    plain.load_state_dict(state["model"])  # strict: same keys, same shapes


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_runs_a_step(tmp_path: Path, precision: str) -> None:
    t = trainer(tmp_path, f'precision = "{precision}"')
    before = params_of(t.method.model)
    try:
        out = one_step(t)
    except RuntimeError as err:  # fp16 autocast / GradScaler support on CPU varies by build
        if precision == "fp16":
            pytest.skip(f"fp16 autocast is not supported on this CPU build: {str(err).splitlines()[0]}")
        raise
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert out["logits"].dtype == want  # the forward really ran in the asked precision
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32  # CE autocasts to fp32
    assert t.scaler.is_enabled() == (precision == "fp16")
    after = params_of(t.method.model)
    assert all(p.dtype == torch.float32 for p in after)  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_channels_last_trains_nhwc_and_saves_plain_keys(tmp_path: Path) -> None:
    t = trainer(tmp_path, "channels_last = true", name="cl")
    model = t.method.model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen: list[bool] = []
    first = convs[0]
    handle = first.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    out_cl = one_step(t)
    handle.remove()
    assert seen == [True]  # the batch reaches the first convolution in NHWC

    reference = trainer(tmp_path, "channels_last = false", name="plain")  # same seed and batch, NCHW
    assert reference.method.model.conv1.weight.is_contiguous()
    out_plain = one_step(reference)
    assert torch.allclose(out_cl["loss"], out_plain["loss"], atol=1e-4)
    for a, b in zip(model.parameters(), reference.method.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)

    assert t.fit() == EXIT_FINISHED
    assert_loads_into_plain_model(t)


def test_channels_last_default_is_measured_per_device(tmp_path: Path) -> None:
    """`auto` (the default) is on for CPU, where bench/switches.py measured it faster, off elsewhere."""
    from engine.recipe import RecipeError, TrainSection, load_recipe

    t = trainer(tmp_path, "", name="auto")
    assert t.recipe.train.channels_last == "auto"
    assert t.method.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert TrainSection().channels_last_on("cpu") and not TrainSection().channels_last_on("cuda")
    assert TrainSection(channels_last=True).channels_last_on("cuda")
    assert not TrainSection(channels_last=False).channels_last_on("cpu")
    bad = write_recipe(tmp_path, '[train]\nchannels_last = "fast"\n', "bad.toml")
    with pytest.raises(RecipeError, match=r'train\.channels_last: expected true, false or "auto", got .fast.'):
        load_recipe(bad)


def _eager_compile(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Module.compile with the aot_eager backend: dynamo + AOT autograd as with inductor, but no
    C++ code generation (inductor takes minutes per model on this 2-core machine)."""
    compiled: list[torch.nn.Module] = []
    real = torch.nn.Module.compile

    def compile_eager(self: torch.nn.Module, *args: object, **kwargs: object) -> None:
        compiled.append(self)
        real(self, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    return compiled


def test_compile_trains_compiled_and_saves_plain_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    compiled = _eager_compile(monkeypatch)
    torch._dynamo.reset()
    t = trainer(tmp_path, "compile = true", name="compiled")
    assert compiled == [t.method.model]
    torch._dynamo.utils.counters.clear()
    out = one_step(t)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step went through dynamo
    reference = trainer(tmp_path, "", name="plain")
    assert torch.allclose(out["loss"], one_step(reference)["loss"], atol=1e-5)
    assert t.fit() == EXIT_FINISHED
    assert_loads_into_plain_model(t)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_with_inductor(tmp_path: Path) -> None:
    """The real default backend (C++ code generation on CPU): minutes here, hence slow."""
    import torch._dynamo

    torch._dynamo.reset()
    t = trainer(tmp_path, "compile = true\nchannels_last = true", name="inductor")
    assert t.fit() == EXIT_FINISHED
    assert_loads_into_plain_model(t)
    torch._dynamo.reset()


def fake_teacher(path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, 10)
    save_checkpoint({"model": model.state_dict(), "arch": arch, "num_classes": 10, "dataset": "embedded",
                     "class_names": list(CLASS_NAMES)}, path)
    return path


@pytest.mark.parametrize(("method", "student", "teacher"), [("kd", "resnet8", "resnet14"),
                                                            ("hsakd", "resnet8_aux", "resnet14_aux")])
def test_teacher_runs_in_inference_mode_in_the_step_precision(tmp_path: Path, method: str, student: str,
                                                              teacher: str) -> None:
    ckpt = fake_teacher(tmp_path / "teacher.pt", teacher)
    t = trainer(tmp_path, 'precision = "bf16"\nchannels_last = true', method=method, arch=student,
                extra=f'[teacher]\ncheckpoint = "{ckpt}"\n', name=method)
    net = t.method.teacher.model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls: list[tuple[bool, bool, bool, torch.dtype]] = []

    def spy(module: torch.nn.Module, args: tuple[torch.Tensor], output: object) -> None:
        main = output[0] if isinstance(output, tuple) else output
        main = main.logits if isinstance(main, Features) else main
        calls.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), module.training, main.dtype))

    net.register_forward_hook(spy)
    if method == "hsakd":
        net.backbone.register_forward_hook(spy)
    out = one_step(t)
    assert torch.isfinite(out["loss"])
    assert calls and all(c == (True, False, False, torch.bfloat16) for c in calls), calls
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    for key, value in net.state_dict().items():  # weights and BN running statistics unchanged
        assert torch.equal(value, before[key]), key
    assert any(p.grad is not None for p in t.method.model.parameters())  # the student did learn


def test_fast_hue_shift_matches_torchvision_on_edge_cases() -> None:
    """augment._shift_hue is branch-free for speed: check it where branches matter (grays, ties for
    the maximum channel, pure primaries, 8-bit values) and at the largest shifts."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from engine.data import augment as aug

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(12, 3, 6, 6, generator=g) * 255).round() / 255  # 8-bit values, as from uint8 data
    x[0] = x[0, :1]  # gray everywhere: hue 0, unchanged by any shift
    x[1, 1] = x[1, 0]  # red == green
    x[2, 2] = x[2, 1]  # green == blue
    x[3, 2] = x[3, 0]  # red == blue
    x[4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red
    x[5] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    x[6] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    x[7] = 0.0  # black
    x[8] = 1.0  # white
    shifts = torch.tensor([0.5, -0.5, 0.25, -0.25, 0.1, -0.1, 0.5, 0.3, -0.3, 0.0, 0.49, -0.49])
    ours = aug._shift_hue(x, shifts)
    ref = torch.stack([tvf.adjust_hue(x[i], float(shifts[i])) for i in range(len(x))])
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().amax((1, 2, 3))
    assert torch.equal(ours[0], x[0]) and torch.equal(ours[7], x[7]) and torch.equal(ours[8], x[8])
