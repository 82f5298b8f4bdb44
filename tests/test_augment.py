"""Batched augmentation: exact geometry, label order, per-sample and seeded randomness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.data import augment as A


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_images(b: int = 16, size: int = 8) -> torch.Tensor:
    """uint8 images whose every pixel value is distinct within an image (and across channels)."""
    base = torch.arange(3 * size * size).reshape(3, size, size) % 250 + 1
    return torch.stack([(base + 3 * i) % 256 for i in range(b)]).to(torch.uint8)


def test_crop_offsets_and_flips_exact() -> None:
    x, pad = coded_images(32, 8), 2
    out, p = A.random_crop_flip(x, pad=pad, generator=gen(1), return_params=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (pad, pad, pad, pad))
    for b in range(x.shape[0]):
        dy, dx = int(p.dy[b]), int(p.dx[b])
        want = padded[b, :, dy:dy + 8, dx:dx + 8]
        if p.flip[b]:
            want = want.flip(-1)
        assert torch.equal(out[b], want)
    # per-sample randomness: not all samples share one offset / flip
    assert len(set(zip(p.dy.tolist(), p.dx.tolist(), strict=True))) > 1
    assert 0 < int(p.flip.sum()) < x.shape[0]
    assert int(p.dy.min()) >= 0 and int(p.dy.max()) <= 2 * pad


def test_crop_reproducible_and_no_flip() -> None:
    x = coded_images(8, 8)
    a = A.random_crop_flip(x, generator=gen(3))
    b = A.random_crop_flip(x, generator=gen(3))
    c = A.random_crop_flip(x, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, p = A.random_crop_flip(x, flip=False, generator=gen(3), return_params=True)
    assert not p.flip.any()
    assert torch.equal(A.random_crop_flip(x, pad=0, flip=False, generator=gen(0)), x)


def test_hflip_mask() -> None:
    x = coded_images(4, 6)
    mask = torch.tensor([True, False, True, False])
    out = A.hflip(x, mask)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def test_normalize() -> None:
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = A.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert y.dtype == torch.float32
    assert torch.allclose(y[:, 0], torch.tensor(2.0)) and torch.allclose(y[:, 2], torch.tensor(0.5))
    assert torch.equal(A.eval_transform(x, (0.5,) * 3, (0.5,) * 3), A.normalize(x, (0.5,) * 3, (0.5,) * 3))


def test_rotate4_exact_and_labels() -> None:
    x = coded_images(3, 5)
    r = A.rotate4(x)
    assert r.shape == (12, 3, 5, 5)
    for b in range(3):
        for k in range(4):
            assert torch.equal(r[4 * b + k], torch.rot90(x[b], k, dims=(1, 2)))
    y = torch.tensor([2, 0, 7])
    assert A.joint_labels(y).tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 28, 29, 30, 31]
    assert A.rotation_labels(3).tolist() == [0, 1, 2, 3] * 3
    assert torch.equal(A.joint_labels(y) // 4, y.repeat_interleave(4))
    with pytest.raises(ValueError):
        A.rotate4(torch.zeros(1, 3, 4, 5))


def test_random_resized_crop_identity_and_size() -> None:
    x = coded_images(6, 8)
    same = A.random_resized_crop(x, 8, scale=(1, 1), ratio=(1, 1), generator=gen(0))
    assert torch.equal(same, x)
    out, p = A.random_resized_crop(x, 12, generator=gen(0), return_params=True)
    assert out.shape == (6, 3, 12, 12) and out.dtype == torch.uint8
    assert ((p.top >= 0) & (p.top + p.height <= 8) & (p.left >= 0) & (p.left + p.width <= 8)).all()
    assert len(set(p.width.tolist()) | set(p.height.tolist())) > 1  # per-sample boxes
    flipped = A.random_resized_crop(x, 8, scale=(1, 1), ratio=(1, 1), generator=gen(0), flip_p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    xf = x.float() / 255
    assert torch.allclose(A.random_resized_crop(xf, 8, (1, 1), (1, 1), generator=gen(0)), xf, atol=1e-5)


def test_random_resized_crop_box_content() -> None:
    """A crop resized to its own size is exactly that slice of the input."""
    x = coded_images(1, 8).expand(64, -1, -1, -1).contiguous()
    out, p = A.random_resized_crop(x, 4, scale=(0.25, 0.25), ratio=(1, 1), generator=gen(2), return_params=True)
    assert (p.height == 4).all() and (p.width == 4).all()
    for b in range(64):
        t, left = int(p.top[b]), int(p.left[b])
        assert torch.equal(out[b], x[b, :, t:t + 4, left:left + 4])
    assert len(set(zip(p.top.tolist(), p.left.tolist(), strict=True))) > 1


def test_random_resized_crop_matches_torchvision_per_sample() -> None:
    """Every sample's box resized as torchvision's resized_crop(antialias=False), then flipped where
    drawn: up- and downsampling, boxes at the image edges, no pixel from outside the box."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(64, 3, 20, 24, generator=gen(7))
    for size in (32, 20, 12):
        out, p = A.random_resized_crop(x, size, generator=gen(size), flip_p=0.5, return_params=True)
        assert 0 < int(p.flip.sum()) < 64 and int(p.left.min()) == 0 and int((p.left + p.width).max()) == 24
        for i in range(64):
            box = (int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]))
            ref = tvf.resized_crop(x[i], *box, [size, size], antialias=False)
            ref = ref.flip(-1) if p.flip[i] else ref
            assert torch.allclose(out[i], ref, atol=1e-5), (size, i, box)
    # a constant box stays constant: nothing from outside the box leaks in at its edges
    x = torch.zeros(1, 3, 16, 16)
    x[..., 4:12, 4:12] = 1
    out, p = A.random_resized_crop(x.expand(256, -1, -1, -1), 16, scale=(0.05, 0.15), generator=gen(1),
                                   return_params=True)
    inside = (p.top >= 4) & (p.left >= 4) & (p.top + p.height <= 12) & (p.left + p.width <= 12)
    assert int(inside.sum()) > 0 and bool((out[inside] == 1).all())


def test_simclr_views_are_the_public_ops_in_turn() -> None:
    """simclr_views works in place for speed; it must give what the public ops give, bit for bit."""
    x = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen(8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    views = A.simclr_views(x, gen(9), mean=mean, std=std, size=12)
    assert views.shape == (48, 3, 12, 12)
    g = gen(9)
    for got in views.chunk(2):
        v = A.random_resized_crop(x.float() / 255, 12, (0.08, 1.0), (3 / 4, 4 / 3), g, flip_p=0.5)
        v = A.color_jitter(v, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=g)
        v = A.normalize(A.random_grayscale(v, 0.2, g), mean, std)
        assert torch.equal(got, v)


def test_grayscale_and_jitter() -> None:
    x = torch.rand(32, 3, 6, 6, generator=gen(0))
    g = A.random_grayscale(x, 1.0, generator=gen(0))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert torch.equal(A.random_grayscale(x, 0.0, generator=gen(0)), x)
    some = A.random_grayscale(x, 0.5, generator=gen(1))
    is_gray = (some[:, 0] == some[:, 1]).flatten(1).all(1)
    assert 0 < int(is_gray.sum()) < 32
    gu = A.random_grayscale((x * 255).to(torch.uint8), 1.0, generator=gen(0))
    assert gu.dtype == torch.uint8 and torch.equal(gu[:, 0], gu[:, 2])

    assert torch.equal(A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.0, generator=gen(0)), x)
    j1 = A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=1.0, generator=gen(5))
    j2 = A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=1.0, generator=gen(5))
    assert torch.equal(j1, j2) and j1.min() >= 0 and j1.max() <= 1
    # per-sample factors: the same image repeated gets different results
    rep = x[:1].expand(8, -1, -1, -1)
    jr = A.color_jitter(rep, 0.4, 0.4, 0.4, 0.1, p=1.0, generator=gen(6))
    assert len({tuple(v.flatten()[:5].tolist()) for v in jr}) == 8


def test_hue_matches_torchvision() -> None:
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(4, 3, 5, 5, generator=gen(1))
    ours = A.color_jitter(x, 0, 0, 0, 0.1, p=1.0, generator=gen(2))
    # recover the drawn hue shift the same way color_jitter draws it
    g = gen(2)
    torch.rand((4,), generator=g)
    factors = [torch.rand((4,), generator=g) for _ in range(4)]
    shift = factors[3] * 0.2 - 0.1
    ref = torch.stack([tvf.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_jitter_matches_torchvision_per_sample_with_its_own_order() -> None:
    """Every sample: its own factors, in its own random order of the four ops, as torchvision's
    functional ops applied one image at a time; unselected samples untouched."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    b = 48
    x = torch.rand(b, 3, 7, 7, generator=gen(3))
    ours = A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=gen(4))
    g = gen(4)  # the draws, in color_jitter's order
    apply = torch.rand((b,), generator=g) < 0.8
    lo_hi = [(0.6, 1.4)] * 3 + [(-0.1, 0.1)]
    factors = torch.stack([torch.rand((b,), generator=g) * (hi - lo) + lo for lo, hi in lo_hi], 1)
    order = torch.rand((b, 4), generator=g).argsort(1)
    ops = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue]
    assert 0 < int(apply.sum()) < b and len({tuple(o) for o in order.tolist()}) > 6
    for i in range(b):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = ops[op](ref, float(factors[i, op]))
        assert torch.allclose(ours[i], ref, atol=1e-5), (i, order[i].tolist())
        if not apply[i]:
            assert torch.equal(ours[i], x[i])


def test_simclr_views() -> None:
    x = coded_images(8, 8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    v1, v2 = A.simclr_views(x, gen(0), mean=mean, std=std).chunk(2)
    assert v1.shape == v2.shape == (8, 3, 8, 8) and v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    w1, w2 = A.simclr_views(x, gen(0), mean=mean, std=std).chunk(2)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    # no augmentation at all -> both views are the normalised input
    n1, n2 = A.simclr_views(x, gen(0), mean=mean, std=std, crop_scale=(1, 1), jitter_p=0, gray_p=0,
                            flip_p=0, crop_ratio=(1, 1)).chunk(2)
    assert torch.allclose(n1, A.normalize(x, mean, std), atol=1e-5) and torch.allclose(n1, n2)
