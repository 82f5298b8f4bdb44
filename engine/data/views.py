"""Multi-view augmentation for the self-supervised methods: one batched pipeline, many view specs.

Each `ViewSpec` is one view of every image: RandomResizedCrop (+ horizontal flip), colour jitter with
probability jitter_p, grayscale with gray_p, Gaussian blur with blur_p, solarisation with solarize_p,
then normalisation; solo-learn's order (solo/data/pretrain_dataloader.py build_transform_pipeline; it
flips last, which commutes with every op here). `make_views` draws all specs' per-sample parameters
first, from one CPU generator, spec by spec, then runs each op once over all rows of the views that
share a size (DINO's local crops are one such group), in place, as simclr_views does for SimCLR: the
cost is per-op dispatch, not arithmetic. SimCLR's two views are make_views with two equal specs of
blur_p = solarize_p = 0 (augment.simclr_views), bit for bit: an op whose probability is 0 draws nothing.

Sources of the presets (`VIEW_PRESETS`): solo-learn's CIFAR recipes, vturrisi/solo-learn
scripts/pretrain/cifar/<method>.yaml (byol 4d64ac0, barlow / dino 07f8c3b, simsiam 3a64e55, mocov2plus /
vicreg 1df0b89), whose views are scripts/pretrain/cifar/augmentations/{asymmetric,symmetric_weak}.yaml
(commit 2432289) or inline:
- byol, barlow_twins, dino: asymmetric.yaml. Jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, crop scale
  (0.08, 1), flip 0.5, no blur on either view, solarisation p 0 on view 1 and 0.2 on view 2. The ImageNet
  recipes (imagenet-100/augmentations/asymmetric.yaml, the BYOL paper) blur with p 1.0 / 0.1 instead.
- simsiam, mocov2plus: symmetric_weak.yaml. Jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2, crop scale
  (0.08, 1), flip 0.5, blur p 0.5 on both views, no solarisation. (The older shell scripts,
  scripts/pretrain/cifar/{simsiam,mocov2plus}.sh, passed --gaussian_prob 0.0 0.0.)
- vicreg: inline in vicreg.yaml. Crop scale (0.2, 1), jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, no
  blur, solarisation p 0.1 on both views, flip 0.5.

Differences from solo-learn, on purpose: crops are resampled bilinearly (augment.random_resized_crop;
solo-learn asks torchvision for bicubic), and every op works on float images (PIL rounds to uint8
after each op). Blur: solo-learn blurs with PIL's ImageFilter.GaussianBlur(radius=sigma), sigma ~
U(0.1, 2.0), which has no kernel size; here it is torchvision's gaussian_blur (reflect padding) with
the kernel truncated at 3 sigma of the largest sigma, 2 * ceil(3 * sigma_max) + 1 = 13 taps for 2.0
(at most 2 * size - 1, so the reflection fits). The SimCLR convention of 10% of the image side (23 taps
at 224 px) would give 3 taps at 32 px, far too few for sigma 2. Solarisation is torchvision's solarize
on [0, 1] floats with threshold 0.5 (PIL's ImageOps.solarize inverts uint8 values >= 128).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.data.augment import (
    JitterParams,
    ResizedCropParams,
    _as_float,
    _cat_params,
    _color_jitter_,
    _crop_resize,
    _grayscale_rows_,
    _normalizer,
    _on,
    _rand,
    _reflect,
    _uniform,
    resized_crop_params,
)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. size None: the input's size. Probabilities are per sample."""

    size: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


_ASYMMETRIC = (ViewSpec(), ViewSpec(solarize_p=0.2))
_SYMMETRIC_WEAK = (ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5),) * 2
VIEW_PRESETS: dict[str, tuple[ViewSpec, ...]] = {
    "byol": _ASYMMETRIC,
    "barlow_twins": _ASYMMETRIC,
    "dino": _ASYMMETRIC,
    "simsiam": _SYMMETRIC_WEAK,
    "mocov2plus": _SYMMETRIC_WEAK,
    "vicreg": (ViewSpec(crop_scale=(0.2, 1.0), solarize_p=0.1),) * 2,
}


# ---------------------------------------------------------------- the two new ops

def blur_kernel_size(sigma_max: float, size: int) -> int:
    """Odd taps covering 3 sigma either side, and at most 2 size - 1 (reflect padding needs pad < size)."""
    return min(2 * math.ceil(3 * sigma_max) + 1, 2 * size - 1)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """[R] sigmas -> [R, K] normalised 1-D Gaussians, as torchvision's _get_gaussian_kernel1d builds them."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32)
    return torch.softmax(x.div(sigma.float()[:, None]).pow(2).neg(), dim=1)


def blur_matrices(kernels: Tensor, n: int) -> Tensor:
    """[R, K] 1-D kernels -> [R, n, n] matrices M with (row @ M)[j] = the kernel applied at j to the row
    reflect-padded by K // 2: the padding folded into the band, so no padded copy is made."""
    r, k = kernels.shape
    j, tap = torch.arange(n)[:, None], torch.arange(k)[None, :]
    flat = (_reflect(j + tap - k // 2, n) * n + j).reshape(-1)  # M[source, j]
    m = torch.zeros(r, n * n, dtype=kernels.dtype)
    return m.scatter_add_(1, flat.expand(r, -1), kernels[:, None, :].expand(r, n, k).reshape(r, -1)).view(r, n, n)


def gaussian_blur_(x: Tensor, rows: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur x[rows] (float [B,C,H,W]) in place, row r with its own sigma[r]: torchvision's gaussian_blur
    (reflect padding, K x K kernel) done separably, as two batched matrix products with per-sample banded
    matrices (built on the CPU). Measured on CPU, 1 thread, 256 rows of 3x32x32 with 13 taps: about 1.6x
    faster than the same blur as grouped convolutions with one kernel per (sample, channel)."""
    if not rows.numel():
        return x
    dev = x.device
    index = _on(rows, dev)
    part = x.index_select(0, index)
    r, c, h, w = part.shape
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(h, w):
        raise ValueError(f"kernel size {kernel_size}: expected odd, with K // 2 < {min(h, w)} (reflect padding)")
    kernels = gaussian_kernels(sigma, kernel_size)
    along_w = _on(blur_matrices(kernels, w), dev)
    along_h = along_w if h == w else _on(blur_matrices(kernels, h), dev)
    out = torch.bmm(part.view(r, c * h, w), along_w).view(r, c, h, w)
    out = torch.matmul(along_h.transpose(1, 2)[:, None], out)  # [R,1,H,H] @ [R,C,H,W]
    return x.index_copy_(0, index, out)


def solarize_(x: Tensor, rows: Tensor) -> Tensor:
    """torchvision's solarize on float x[rows], in place: values >= 0.5 become 1 - value."""
    if rows.numel():
        index = _on(rows, x.device)
        part = x.index_select(0, index)
        x.index_copy_(0, index, torch.where(part >= 0.5, 1 - part, part))
    return x


# ---------------------------------------------------------------- the pipeline

@dataclass
class _Draws:
    """One spec's per-sample parameters; blur / solarize are None where their probability is 0."""

    crop: ResizedCropParams
    jitter: JitterParams
    gray: Tensor  # bool [B]
    blur: Tensor | None  # bool [B]
    sigma: Tensor | None  # float [B]
    solarize: Tensor | None  # bool [B]


def _draw(spec: ViewSpec, b: int, h: int, w: int, generator: torch.Generator | None) -> _Draws:
    """In the public ops' order (crop + flip, jitter, grayscale), then blur, then solarisation."""
    crop = resized_crop_params(b, h, w, spec.crop_scale, spec.crop_ratio, spec.flip_p, generator)
    jitter = JitterParams.draw(b, spec.jitter, spec.jitter_p, generator)
    gray = _rand(b, generator) < spec.gray_p
    blur = sigma = solarize = None
    if spec.blur_p > 0:
        blur = _rand(b, generator) < spec.blur_p
        sigma = _uniform(b, spec.blur_sigma[0], spec.blur_sigma[1], generator)
    if spec.solarize_p > 0:
        solarize = _rand(b, generator) < spec.solarize_p
    return _Draws(crop, jitter, gray, blur, sigma, solarize)


def _group_key(spec: ViewSpec, default_size: int) -> tuple[int, tuple[bool, ...]]:
    """Views run together when they share the output size and which jitter ops are on."""
    return spec.size or default_size, tuple(v > 0 for v in spec.jitter)


def _run_group(x_t: Tensor, b: int, specs: list[ViewSpec], draws: list[_Draws], size: int,
               mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """All rows of views of one size: [len(specs) * B, 3, size, size], view after view."""
    n = len(specs)
    v = _crop_resize(x_t, _cat_params([d.crop for d in draws]), size, source=torch.arange(b).repeat(n))
    v = _color_jitter_(v, _cat_params([d.jitter for d in draws]), specs[0].jitter)
    v = _grayscale_rows_(v, torch.cat([d.gray for d in draws]).nonzero().squeeze(1))
    by_kernel: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for i, (spec, d) in enumerate(zip(specs, draws, strict=True)):
        if d.blur is not None and d.sigma is not None:
            rows = d.blur.nonzero().squeeze(1)
            by_kernel.setdefault(blur_kernel_size(spec.blur_sigma[1], size), []).append((rows + i * b, d.sigma[rows]))
    for k, parts in by_kernel.items():
        v = gaussian_blur_(v, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), k)
    solar = [d.solarize.nonzero().squeeze(1) + i * b for i, d in enumerate(draws) if d.solarize is not None]
    if solar:
        v = solarize_(v, torch.cat(solar))
    scale, _, shift = _normalizer(tuple(mean), tuple(std), x_t.device)
    return v.mul_(scale).sub_(shift)


def view_groups(images: Tensor, generator: torch.Generator | None, specs: Sequence[ViewSpec],
                mean: Sequence[float], std: Sequence[float]) -> list[tuple[list[int], Tensor]]:
    """make_views before the split: (spec indices, their rows as one batch) per group of views."""
    b, _, h, w = images.shape
    draws = [_draw(spec, b, h, w, generator) for spec in specs]
    groups: dict[tuple[int, tuple[bool, ...]], list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_group_key(spec, w), []).append(i)
    x_t = _as_float(images).transpose(2, 3).contiguous()  # the column pass of the crop reads rows of this
    return [(members, _run_group(x_t, b, [specs[i] for i in members], [draws[i] for i in members], key[0],
                                 mean, std)) for key, members in groups.items()]


def make_views(images_uint8: Tensor, generator: torch.Generator | None, specs: Sequence[ViewSpec],
               mean: Sequence[float], std: Sequence[float]) -> list[Tensor]:
    """One normalised float batch [B,3,S,S] per spec, in the order of specs, from a uint8 (or [0, 1]
    float) batch [B,3,H,W]. Parameters are drawn on the CPU from `generator`, spec after spec, so the
    same generator state gives the same views on any device."""
    out: list[Tensor | None] = [None] * len(specs)
    for members, rows in view_groups(images_uint8, generator, specs, mean, std):
        for i, view in zip(members, rows.chunk(len(members)), strict=True):
            out[i] = view
    return out  # type: ignore[return-value]
