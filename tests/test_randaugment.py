"""FixMatch's RandAugment + Cutout: every op against torchvision per sample, whole strong views rebuilt
from their drawn parameters, per-sample randomness, Cutout boxes, seeds."""

from __future__ import annotations

import pytest
import torch

from engine.data import randaugment as R

tvf = pytest.importorskip("torchvision.transforms.v2.functional")
NEAREST = pytest.importorskip("torchvision.transforms").InterpolationMode.NEAREST


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random uint8 images, one of low contrast (autocontrast stretches it) and one with a constant channel."""
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen(seed))
    x[2] = x[2] // 4 + 60
    x[3, 1] = 77
    return x


def torchvision_op(name: str, image: torch.Tensor, value: float) -> torch.Tensor:
    """The torchvision call each op stands for, with the argument op_values gives."""
    if name == "rotate":
        return tvf.rotate(image, value, NEAREST, fill=0)
    if name in ("shear_x", "shear_y"):
        shear = [value, 0.0] if name == "shear_x" else [0.0, value]
        return tvf.affine(image, 0.0, [0, 0], 1.0, shear, NEAREST, fill=0, center=[0, 0])
    if name in ("translate_x", "translate_y"):
        shift = [int(value), 0] if name == "translate_x" else [0, int(value)]
        return tvf.affine(image, 0.0, shift, 1.0, [0.0, 0.0], NEAREST, fill=0)
    calls = {"brightness": tvf.adjust_brightness, "color": tvf.adjust_saturation, "contrast": tvf.adjust_contrast,
             "sharpness": tvf.adjust_sharpness, "solarize": tvf.solarize,
             "posterize": lambda im, v: tvf.posterize(im, int(v)),
             "autocontrast": lambda im, v: tvf.autocontrast(im), "equalize": lambda im, v: tvf.equalize(im),
             "identity": lambda im, v: im}
    return calls[name](image, value)


def test_op_values_follow_kekmodel() -> None:
    levels, negate = torch.tensor([1, 5, 9]), torch.tensor([False, True, False])
    assert R.op_values("brightness", levels, negate, 32, 32).tolist() == pytest.approx([0.14, 0.5, 0.86], abs=1e-7)
    assert R.op_values("posterize", levels, negate, 32, 32).tolist() == [4, 6, 7]
    assert R.op_values("solarize", levels, negate, 32, 32).tolist() == [231, 128, 26]
    assert R.op_values("rotate", levels, negate, 32, 32).tolist() == [3, -15, 27]
    assert R.op_values("translate_x", levels, negate, 32, 32).tolist() == [0, -4, 8]  # int(0.03 v * 32)
    assert R.op_values("translate_y", levels, negate, 20, 32).tolist() == [0, -3, 5]  # of the height
    shear = R.op_values("shear_x", levels, negate, 32, 32)
    assert torch.tan(torch.deg2rad(shear)).tolist() == pytest.approx([0.03, -0.15, 0.27])


@pytest.mark.parametrize("name", sorted(R.COLOUR_OPS))
def test_colour_ops_match_torchvision_exactly(name: str) -> None:
    """uint8 exact: same float32 arithmetic, truncation, and fused blend as torchvision's kernels."""
    x = images()
    values = R.op_values(name, torch.arange(1, 10), torch.zeros(9, dtype=torch.bool), 32, 32)
    ours = R.COLOUR_OPS[name](x, values)
    assert ours.dtype == torch.uint8
    for i in range(9):
        assert torch.equal(ours[i], torchvision_op(name, x[i], float(values[i]))), (name, i)
    if name not in ("equalize", "autocontrast"):  # magnitudes really differ per sample
        assert len({tuple(ours[i, 0, 5, :6].tolist()) for i in (0, 4, 8)}) >= 2


def test_geometric_ops_share_one_affine_call_and_match_torchvision() -> None:
    """Rows of all five geometric ops, each with its own signed magnitude, through one grid_sample."""
    x = images(10)
    names = [R.GEOMETRIC[i % 5] for i in range(10)]
    levels = torch.tensor([3, 9, 5, 7, 9, 8, 2, 6, 4, 9])
    negate = torch.tensor([False, True, True, False, False, True, False, True, True, True])
    values = [R.op_values(n, levels[i:i + 1], negate[i:i + 1], 32, 32) for i, n in enumerate(names)]
    matrices = torch.cat([R.inverse_affine(n, v, 32, 32) for n, v in zip(names, values, strict=True)])
    ours = R.affine_nearest(x, matrices)
    for i, name in enumerate(names):
        assert torch.equal(ours[i], torchvision_op(name, x[i], float(values[i][0]))), (name, i)
    assert (ours[0, :, 0, 0] == 0).all() or (ours[5, :, 0, 0] == 0).all()  # corners leave the image: fill 0
    identity = R.inverse_affine("translate_x", torch.zeros(2, dtype=torch.float64), 32, 32)
    assert torch.equal(R.affine_nearest(x[:2], identity), x[:2])


def rebuild(x: torch.Tensor, p: R.RandAugmentParams, index: int, cutout_size: int) -> torch.Tensor:
    """One strong view from its parameters with torchvision's ops one at a time, then the box by hand."""
    _, _, h, w = x.shape
    image = x[index]
    for name, value in R.strong_view_ops(p, index, h, w):
        image = torchvision_op(name, image, value)
    image = image.clone()
    top, left = (max(0, int(c - cutout_size / 2)) for c in p.centre[index].tolist())
    image[:, top:min(h, top + cutout_size), left:min(w, left + cutout_size)] = 127
    return image


def test_strong_views_are_each_images_own_ops_in_turn() -> None:
    """Grouped by op slot by slot, the batch equals each image's own sequence, applied ops or skipped."""
    x = images(48, seed=1)
    out, p = R.randaugment(x, gen(2), n=2, magnitude=10, return_params=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(48):
        assert torch.equal(out[i], rebuild(x, p, i, 16)), (i, R.strong_view_ops(p, i, 32, 32))
    applied = {R.OPS[int(o)] for o, a in zip(p.op.flatten(), p.apply.flatten(), strict=True) if a}
    assert len(applied) >= 10  # most ops took part, in the same batch


def test_per_sample_ops_levels_and_signs_differ() -> None:
    x = images()[:1].expand(256, -1, -1, -1).contiguous()
    out, p = R.randaugment(x, gen(3), n=2, magnitude=10, cutout_fraction=0, return_params=True)
    assert set(p.op.flatten().tolist()) == set(range(len(R.OPS)))
    assert set(p.level.flatten().tolist()) == set(range(1, 10))  # randint(1, 10): 1..9
    assert 0.4 < p.apply.float().mean() < 0.6 and 0.4 < p.negate.float().mean() < 0.6
    # about 28% draw no change ((0.5 + 0.5 / 14) ** 2 per image); the rest are mostly all different
    assert len({tuple(o.flatten()[::97].tolist()) for o in out}) > 100
    untouched = ~p.apply.any(1)
    assert torch.equal(out[untouched], x[untouched]) and int(untouched.sum()) > 30


def test_cutout_boxes_sizes_and_fill() -> None:
    centre = torch.tensor([[16.0, 16.0], [2.5, 31.9], [30.0, 0.0], [7.99, 24.0]])
    top, left, bottom, right = R.cutout_boxes(centre, 32, 32, 16)
    assert top.tolist() == [8, 0, 22, 0] and left.tolist() == [8, 23, 0, 16]
    assert (bottom - top).tolist() == [16, 16, 10, 16] and (right - left).tolist() == [16, 9, 16, 16]
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    out = R.cutout(x, (top, left, bottom, right))
    assert [int((o[0] == 127).sum()) for o in out] == [256, 144, 160, 256]
    assert torch.equal(out[0, :, 8:24, 8:24], torch.full((3, 16, 16), 127, dtype=torch.uint8))
    # through randaugment: 16 = int(0.5 * 32); most boxes are whole, the rest clipped at the far edges
    _, p = R.randaugment(images(512, seed=4), gen(5), return_params=True)
    t, lft, b, r = R.cutout_boxes(p.centre, 32, 32, 16)
    heights, widths = (b - t).float(), (r - lft).float()
    assert heights.max() == 16 and heights.min() >= 8 and widths.min() >= 8
    assert 0.65 < (heights == 16).float().mean() < 0.9  # P(centre < 25) = 25 / 32


def test_reproducible_from_a_seed_and_checked_inputs() -> None:
    x = images(16, seed=6)
    a, b, c = (R.randaugment(x, gen(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(TypeError, match="uint8"):
        R.randaugment(x.float(), gen(0))
    with pytest.raises(ValueError, match="magnitude"):
        R.randaugment(x, gen(0), magnitude=1)
