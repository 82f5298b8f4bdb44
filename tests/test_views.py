"""Multi-view augmentation: the new ops per sample against torchvision, whole views against the public
ops called in turn, multi-crop shapes, and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from engine.data import augment as A
from engine.data import views as V

tvf = pytest.importorskip("torchvision.transforms.v2.functional")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_blur_matches_torchvision_per_sample_and_leaves_other_rows_alone() -> None:
    x = torch.rand(12, 3, 16, 16, generator=gen(1))
    rows = torch.tensor([0, 3, 4, 9, 11])
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 5.0])  # 5.0: wider than the kernel, a near box filter
    for k in (3, 13, V.blur_kernel_size(2.0, 16)):
        out = V.gaussian_blur_(x.clone(), rows, sigma, k)
        for r, s in zip(rows.tolist(), sigma.tolist(), strict=True):
            ref = tvf.gaussian_blur(x[r], [k, k], [s, s])
            assert torch.allclose(out[r], ref, atol=1e-5), (k, r, s)
        others = [i for i in range(12) if i not in rows.tolist()]
        assert torch.equal(out[others], x[others])
    blurred = V.gaussian_blur_(x.clone(), rows, sigma, 13)
    assert torch.allclose(blurred[0], x[0], atol=1e-6) and not torch.allclose(blurred[3], x[3], atol=1e-2)
    wide = torch.rand(3, 3, 10, 14, generator=gen(2))  # not square: one band matrix per direction
    out = V.gaussian_blur_(wide.clone(), torch.arange(3), torch.tensor([0.5, 1.0, 2.0]), 9)
    for i, s in enumerate((0.5, 1.0, 2.0)):
        assert torch.allclose(out[i], tvf.gaussian_blur(wide[i], [9, 9], [s, s]), atol=1e-5)
    with pytest.raises(ValueError, match="reflect"):
        V.gaussian_blur_(wide.clone(), torch.arange(3), torch.ones(3), 21)
    assert V.blur_kernel_size(2.0, 32) == 13 and V.blur_kernel_size(2.0, 4) == 7 and V.blur_kernel_size(0.1, 32) == 3


def test_solarize_matches_torchvision_on_selected_rows_only() -> None:
    x = torch.rand(8, 3, 5, 5, generator=gen(2))
    x[0, 0, 0, :3] = torch.tensor([0.5, 0.4999, 1.0])  # the threshold itself is inverted
    rows = torch.tensor([0, 2, 5])
    out = V.solarize_(x.clone(), rows)
    for i in range(8):
        want = tvf.solarize(x[i], 0.5) if i in rows.tolist() else x[i]
        assert torch.equal(out[i], want), i
    assert out[0, 0, 0, :3].tolist() == pytest.approx([0.5, 0.4999, 0.0])


def public_ops_in_turn(x: torch.Tensor, g: torch.Generator, spec: V.ViewSpec) -> torch.Tensor:
    """One view as the public batched ops and torchvision's blur / solarize give it, drawing from g in
    make_views' order: crop + flip, jitter, grayscale, blur (mask, sigma), solarisation (mask)."""
    b, size = x.shape[0], spec.size or x.shape[-1]
    v = A.random_resized_crop(x.float() / 255, size, spec.crop_scale, spec.crop_ratio, g, flip_p=spec.flip_p)
    v = A.color_jitter(v, *spec.jitter, p=spec.jitter_p, generator=g)
    v = A.random_grayscale(v, spec.gray_p, g)
    if spec.blur_p > 0:
        blur = torch.rand((b,), generator=g) < spec.blur_p
        sigma = torch.rand((b,), generator=g) * (spec.blur_sigma[1] - spec.blur_sigma[0]) + spec.blur_sigma[0]
        k = V.blur_kernel_size(spec.blur_sigma[1], size)
        v = torch.stack([tvf.gaussian_blur(v[i], [k, k], [float(sigma[i])] * 2) if blur[i] else v[i]
                         for i in range(b)])
    if spec.solarize_p > 0:
        solar = torch.rand((b,), generator=g) < spec.solarize_p
        v = torch.stack([tvf.solarize(v[i], 0.5) if solar[i] else v[i] for i in range(b)])
    return A.normalize(v, MEAN, STD)


def test_views_are_the_ops_in_turn_per_spec() -> None:
    """BYOL's asymmetric pair with blur added to view 1, and a small local crop: every sample its own
    crop, jitter, gray, sigma and solarisation; blurred, solarised and untouched rows all present."""
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=gen(3))
    specs = [V.ViewSpec(blur_p=0.5), V.ViewSpec(solarize_p=0.5),
             V.ViewSpec(size=8, crop_scale=(0.05, 0.4), blur_p=0.5, blur_sigma=(0.5, 1.0))]
    views = V.make_views(x, gen(4), specs, MEAN, STD)
    g = gen(4)
    for spec, got in zip(specs, views, strict=True):
        want = public_ops_in_turn(x, g, spec)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert torch.equal(g.get_state(), _after(x, specs, gen(4)).get_state())  # no other draw


def _after(x: torch.Tensor, specs: list[V.ViewSpec], g: torch.Generator) -> torch.Generator:
    V.make_views(x, g, specs, MEAN, STD)
    return g


def test_zero_probability_ops_draw_nothing_so_simclr_is_a_special_case() -> None:
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=gen(5))
    spec = V.ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1))
    ours = torch.cat(V.make_views(x, gen(6), [spec, spec], MEAN, STD))
    assert torch.equal(ours, A.simclr_views(x, gen(6), mean=MEAN, std=STD))


def test_multi_crop_shapes_and_per_sample_randomness() -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen(7))
    local = V.ViewSpec(size=16, crop_scale=(0.05, 0.4), blur_p=0.5)
    specs = [*V.VIEW_PRESETS["dino"], *[local] * 4]
    views = V.make_views(x, gen(8), specs, MEAN, STD)
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 4
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
    same = x[:1].expand(6, -1, -1, -1)
    for v in V.make_views(same, gen(9), specs, MEAN, STD):
        assert len({tuple(row.flatten()[:8].tolist()) for row in v}) == 6  # each sample its own draws


def test_same_generator_state_same_views() -> None:
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(10))
    specs = V.VIEW_PRESETS["simsiam"]
    a, b, c = (V.make_views(x, gen(s), specs, MEAN, STD) for s in (11, 11, 12))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])


def test_presets_follow_solo_learn_cifar() -> None:
    byol = V.VIEW_PRESETS["byol"]
    assert [(v.blur_p, v.solarize_p) for v in byol] == [(0.0, 0.0), (0.0, 0.2)]  # asymmetric.yaml
    assert byol == V.VIEW_PRESETS["barlow_twins"] == V.VIEW_PRESETS["dino"] and byol[0].jitter == (0.4, 0.4, 0.2, 0.1)
    assert all(v.blur_p == 0.5 and v.jitter[2] == 0.4 for v in V.VIEW_PRESETS["mocov2plus"])  # symmetric_weak
    assert {(v.crop_scale, v.solarize_p) for v in V.VIEW_PRESETS["vicreg"]} == {((0.2, 1.0), 0.1)}
    assert all(len(specs) == 2 for specs in V.VIEW_PRESETS.values())
