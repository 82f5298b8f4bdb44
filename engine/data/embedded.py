"""`embedded`: a procedural 10-class glyph dataset, so everything runs with no download.

Each image is one stroke glyph (an arrow, a tee, a fork, ...) drawn upright (+-25 degrees),
at a random position, scale, aspect, shear and stroke width, with per-vertex jitter, on a
cluttered background: a smooth random colour field, a faint grating, 0-3 distractor strokes
made of the same kind of strokes as the glyphs, and pixel noise. Glyph and background
colours are random and independent of the class, so only the stroke *configuration* tells
classes apart, and several classes share parts (arrow/chevron, tee/fork/comb, key/flag).
Glyphs are not rotation invariant, so RotNet / HSAKD rotation labels are learnable.

Generation is vectorised torch on CPU (a loop over the 10 classes only) and deterministic
from the seed: 6,000 images take well under a second.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CLASS_NAMES: tuple[str, ...] = (
    "arrow", "tee", "ell", "chevron", "fork", "cup", "comb", "house", "flag", "key",
)
# Measured once over make_embedded(500, seed=0) (the 5,000 default training images); hardcoded on purpose.
MEAN: tuple[float, float, float] = (0.4966, 0.5051, 0.5093)
STD: tuple[float, float, float] = (0.3012, 0.3031, 0.2997)
DATA_SEED = 0  # the dataset is fixed, like CIFAR; the run seed only picks scale/val subsets
TRAIN_PER_CLASS, TEST_PER_CLASS = 500, 100

Glyph = tuple[list[tuple[float, float]], list[tuple[int, int]]]  # vertices (x, y up), edges


def _chain(points: list[tuple[float, float]], closed: bool = False) -> Glyph:
    edges = [(i, i + 1) for i in range(len(points) - 1)]
    if closed:
        edges.append((len(points) - 1, 0))
    return list(points), edges


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int) -> list[tuple[float, float]]:
    angles = [math.radians(a0 + (a1 - a0) * i / n) for i in range(n + 1)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _merge(*parts: Glyph) -> Glyph:
    verts: list[tuple[float, float]] = []
    edges: list[tuple[int, int]] = []
    for v, e in parts:
        edges += [(a + len(verts), b + len(verts)) for a, b in e]
        verts += v
    return verts, edges


def _glyphs() -> list[Glyph]:
    """Canonical glyphs in [-1, 1]^2, y up. Order matches CLASS_NAMES."""
    arrow = ([(0, -0.85), (0, 0.8), (-0.45, 0.3), (0.45, 0.3)], [(0, 1), (2, 1), (3, 1)])
    tee = ([(-0.7, 0.7), (0.7, 0.7), (0, 0.7), (0, -0.85)], [(0, 2), (2, 1), (2, 3)])
    ell = _chain([(-0.35, 0.85), (-0.35, -0.7), (0.55, -0.7)])
    chevron = _chain([(-0.7, -0.45), (0, 0.55), (0.7, -0.45)])
    fork = (
        [(0, -0.85), (0, -0.05), (-0.6, -0.05), (0.6, -0.05), (-0.6, 0.8), (0, 0.8), (0.6, 0.8)],
        [(0, 1), (2, 1), (1, 3), (2, 4), (1, 5), (3, 6)],
    )
    cup = _chain(_arc(0, 0.1, 0.65, 150, 390, 8))
    ys = (0.8, 0.27, -0.27, -0.8)
    comb = _merge(_chain([(-0.5, y) for y in ys]), *[_chain([(-0.5, y), (0.5, y)]) for y in ys])
    house = _merge(
        _chain([(-0.55, 0.1), (-0.55, -0.8), (0.55, -0.8), (0.55, 0.1)]),
        _chain([(-0.55, 0.1), (0, 0.8), (0.55, 0.1)]),
    )
    flag = _merge(_chain([(-0.5, -0.85), (-0.5, 0.85)]), _chain([(-0.5, 0.85), (0.5, 0.5), (-0.5, 0.15)]))
    key = _merge(
        _chain(_arc(0, 0.45, 0.32, -90, 270, 10)),
        _chain([(0, 0.13), (0, -0.85)]),
        _chain([(0, -0.55), (0.32, -0.55)]),
        _chain([(0, -0.8), (0.32, -0.8)]),
    )
    return [arrow, tee, ell, chevron, fork, cup, comb, house, flag, key]


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def _segment_distance(a: Tensor, b: Tensor, grid: Tensor) -> Tensor:
    """Distance from each pixel centre to the nearest of E segments: a, b [N,E,2] -> [N,P]."""
    ax, ay = a[..., 0, None], a[..., 1, None]                      # [N,E,1]
    dx, dy = b[..., 0, None] - ax, b[..., 1, None] - ay
    rx, ry = grid[:, 0] - ax, grid[:, 1] - ay                      # [N,E,P]
    t = ((rx * dx + ry * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp_(0, 1)
    ex, ey = rx - t * dx, ry - t * dy
    return (ex * ex + ey * ey).amin(dim=1).sqrt()


def _stroke_mask(dist: Tensor, half_width: Tensor) -> Tensor:
    """Antialiased stroke coverage with a one-pixel ramp."""
    return (half_width[:, None] + 0.5 - dist).clamp(0, 1)


def _luma(rgb: Tensor) -> Tensor:
    return rgb @ torch.tensor([0.299, 0.587, 0.114])


def make_embedded(n_per_class: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """Return (images uint8 [10*n,3,size,size], labels int64 [10*n]), balanced, seeded order."""
    g = torch.Generator().manual_seed(seed)
    num_classes = len(CLASS_NAMES)
    n = n_per_class * num_classes
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    px = (torch.arange(size, dtype=torch.float32) + 0.5)
    grid = torch.stack(torch.meshgrid(px, px, indexing="xy"), -1).reshape(-1, 2)  # (x, y) pixels

    # Background: smooth colour field + faint oriented grating.
    base = torch.rand((n, 3, 1, 1), generator=g)
    field = torch.nn.functional.interpolate(
        torch.randn((n, 3, 4, 4), generator=g) * 0.18, size=(size, size), mode="bicubic", align_corners=False
    )
    theta = _uniform(g, (n, 1, 1), 0, math.pi)
    freq = _uniform(g, (n, 1, 1), 0.3, 1.2)
    amp = _uniform(g, (n, 1, 1), 0.0, 0.12)
    gx, gy = grid[:, 0].reshape(size, size), grid[:, 1].reshape(size, size)
    grating = amp * torch.sin(freq * (gx * torch.cos(theta) + gy * torch.sin(theta)))
    img = (base + field + grating[:, None]).clamp(0, 1)

    # Distractor strokes: up to 3 segments, same stroke statistics as the glyphs.
    for _ in range(3):
        on = torch.rand(n, generator=g) < 0.55
        a = _uniform(g, (n, 1, 2), 0, size)
        ang = _uniform(g, (n, 1), 0, 2 * math.pi)
        length = _uniform(g, (n, 1), 5, 14)
        b = a + torch.stack([torch.cos(ang), torch.sin(ang)], -1) * length[..., None]
        hw = _uniform(g, (n,), 0.6, 1.3)
        mask = _stroke_mask(_segment_distance(a, b, grid), hw) * on[:, None]
        color = torch.rand((n, 3), generator=g)
        img = img * (1 - mask.view(n, 1, size, size)) + color[:, :, None, None] * mask.view(n, 1, size, size)

    # Glyph placement: scale, aspect, shear, rotation (upright +-25 deg), translation.
    scale = _uniform(g, (n,), 0.45, 0.85)
    aspect = torch.exp(_uniform(g, (n,), -0.25, 0.25))
    shear = _uniform(g, (n,), -0.2, 0.2)
    rot = _uniform(g, (n,), -25, 25) * math.pi / 180
    limit = (1 - 0.85 * scale)[:, None]
    shift = (torch.rand((n, 2), generator=g) * 2 - 1) * limit
    half_width = _uniform(g, (n,), 0.7, 1.4)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # M = scale * R(rot) @ [[1, shear], [0, 1]] @ diag(aspect, 1/aspect)
    m = torch.stack([
        torch.stack([cos * aspect, (cos * shear - sin) / aspect], -1),
        torch.stack([sin * aspect, (sin * shear + cos) / aspect], -1),
    ], -2) * scale[:, None, None]                                   # [n,2,2]

    glyph_mask = torch.zeros(n, size * size)
    for c, (verts, edges) in enumerate(_glyphs()):
        idx = (labels == c).nonzero().squeeze(1)
        k = idx.numel()
        v = torch.tensor(verts, dtype=torch.float32).expand(k, -1, -1)
        v = v + torch.randn((k, *v.shape[1:]), generator=g) * 0.07
        v = torch.einsum("nij,nvj->nvi", m[idx], v) + shift[idx, None]          # image coords, y up
        v = torch.stack([(v[..., 0] + 1) * size / 2, (1 - v[..., 1]) * size / 2], -1)  # pixels
        e = torch.tensor(edges)
        dist = _segment_distance(v[:, e[:, 0]], v[:, e[:, 1]], grid)
        glyph_mask[idx] = _stroke_mask(dist, half_width[idx])

    # Glyph colour: random, pushed away from the background's luma for a minimum contrast.
    fg = torch.rand((n, 3), generator=g)
    bg_luma = _luma(img.mean((2, 3)))
    diff = _luma(fg) - bg_luma
    sign = torch.where(diff >= 0, 1.0, -1.0)
    fg = (fg + (sign * (0.3 - diff.abs()).clamp_min(0))[:, None]).clamp(0, 1)
    mask = glyph_mask.view(n, 1, size, size)
    img = img * (1 - mask) + fg[:, :, None, None] * mask
    img = img + torch.randn(img.shape, generator=g) * 0.03
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels
