"""Batched GPU-friendly augmentation with per-sample random parameters.

Every random function takes a CPU `torch.Generator`, draws all per-sample parameters on the
CPU (so a seed reproduces them on any device), moves them to the images' device, and
applies them to the whole batch with tensor ops: no Python loop over images. Plain torch
rather than kornia: these few ops are short, exact (tests check offsets pixel for pixel),
need no extra dependency, and let the parameters be returned for inspection.

Images are [B,3,H,W]; uint8 in [0,255] or float in [0,1] unless a function says otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.2989, 0.587, 0.114)  # as torchvision's rgb_to_grayscale (ITU-R 601 with 0.299 rounded down)


def _rand(n: int, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand((n, *shape), generator=generator)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> Tensor:
    return _rand(n, generator) * (hi - lo) + lo


def _on(t: Tensor, device: torch.device) -> Tensor:
    """Per-sample parameters (drawn on the CPU) onto the images' device without a host sync: a plain
    `.to("cuda")` from pageable memory ends in cudaStreamSynchronize, which would stall the CPU
    until the GPU has finished all queued work, several times per batch. Pinned + non_blocking
    does not (the caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _reflect(i: Tensor, n: int) -> Tensor:
    """Indices in [-(n-1), 2(n-1)] reflected into [0, n) without repeating the edge (F.pad's "reflect")."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _like(out: Tensor, ref: Tensor) -> Tensor:
    """Return `out` (float 0..1) in the dtype of `ref` (rounding back to uint8 if needed)."""
    if ref.dtype == torch.uint8:
        return out.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return out.to(ref.dtype)


# ---------------------------------------------------------------- crop + flip (CIFAR standard)

@dataclass
class CropFlipParams:
    """Per-sample draws of random_crop_flip: top-left offsets into the padded image, flip mask."""

    dy: Tensor  # int64 [B], 0..2*pad
    dx: Tensor  # int64 [B]
    flip: Tensor  # bool [B]


def random_crop_flip(
    x: Tensor,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    *,
    reflect: bool = False,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, CropFlipParams]:
    """RandomCrop(H, padding=pad) (zero padding; padding_mode="reflect" if reflect, as FixMatch's weak
    view) + RandomHorizontalFlip, as one gather.

    Output pixel (i, j) of sample b comes from padded pixel (dy + i, dx + j), or (dy + i,
    dx + W-1-j) where flipped: one flat index per sample and pixel, shared by the channels.
    No per-image slicing, no host sync on CUDA; on CPU 2.6-3x faster than gathering rows, then
    columns (uint8, batch 128, 1 thread, interleaved A/B), with the same draws and output.
    Reflection indexes the unpadded image directly (padded index p is image index |p - pad|,
    mirrored at the far edge), so it costs no padded copy.
    """
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flips = (_rand(b, generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool)
    params = CropFlipParams(dy=dy, dx=dx, flip=flips)
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)) if pad and not reflect else x
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = _on(dy, dev)[:, None] + ar_h  # [B,H] source rows in the padded image
    cols = torch.where(_on(flips, dev)[:, None], w - 1 - ar_w, ar_w) + _on(dx, dev)[:, None]  # [B,W]
    if reflect and pad:
        if pad >= min(h, w):
            raise ValueError(f"reflect padding {pad} needs images larger than it, got {h}x{w}")
        rows, cols = _reflect(rows - pad, h), _reflect(cols - pad, w)
    rows = rows * padded.shape[-1]
    index = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    out = padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)
    return (out, params) if return_params else out


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Flip left-right the samples where mask [B] (bool) is true."""
    return torch.where(_on(mask, x.device)[:, None, None, None], x.flip(3), x)


# ---------------------------------------------------------------- normalisation

def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (or float 0..1) -> float32 (x/255 - mean) / std; for uint8 as one new tensor scaled and
    shifted in place, x * (1 / (255 std)) - mean / std (fresh buffers cost more than the arithmetic)."""
    scale, scale_u8, shift = _normalizer(tuple(mean), tuple(std), x.device)
    if x.dtype == torch.uint8:
        return x.float().mul_(scale_u8).sub_(shift)
    return (x * scale).sub_(shift)


@functools.lru_cache(maxsize=32)
def _const(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small float32 constant on `device`, made once (a per-batch host-to-device copy would sync)."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32).to(device)


@functools.lru_cache(maxsize=16)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, ...]:
    """(1 / std, 1 / (255 std), mean / std) as [1,C,1,1] float32 on `device`, made once per device
    (not copied per batch) and never as inference tensors, so autograd may save them."""
    with torch.inference_mode(False):
        s, m = torch.tensor(std, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64)
        return tuple(v.float().view(1, -1, 1, 1).to(device) for v in (1 / s, 1 / (255 * s), m / s))


def eval_transform(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Evaluation is normalisation only (images are already at the training size)."""
    return normalize(x, mean, std)


# ---------------------------------------------------------------- rotations (RotNet, HSAKD)

def rotate4(x: Tensor) -> Tensor:
    """[B,C,H,W] -> [4B,C,H,W]; row 4b+k is torch.rot90(x[b], k, dims=(1, 2)) (HSAKD order).

    Written slice by slice into one [B,4,C,H,W] buffer, with rot90 spelled as transpose + flip:
    about 3x faster on CPU than stacking torch.rot90 views (measured, float32 batches of 128).
    """
    b, c, h, w = x.shape
    if h != w:
        raise ValueError(f"rotate4 needs square images, got {h}x{w}")
    out = x.new_empty((b, 4, c, h, w))
    out[:, 0] = x
    out[:, 1] = x.transpose(2, 3).flip(2)  # 90 degrees counter-clockwise, as rot90(k=1)
    out[:, 2] = x.flip((2, 3))
    out[:, 3] = x.transpose(2, 3).flip(3)
    return out.view(4 * b, c, h, w)


def rotation_labels(batch_size: int, num_rot: int = 4, device: torch.device | str | None = None) -> Tensor:
    """Rotation index k of each row of rotate4: [0,1,2,3,0,1,2,3,...]."""
    return torch.arange(num_rot, device=device).repeat(batch_size)


def joint_labels(y: Tensor, num_rot: int = 4) -> Tensor:
    """HSAKD joint label class*num_rot + k, in rotate4's row order."""
    return (y[:, None] * num_rot + torch.arange(num_rot, device=y.device)).reshape(-1)


# ---------------------------------------------------------------- random resized crop

@dataclass
class ResizedCropParams:
    """Per-sample crop boxes in input pixels (top, left, height, width) and flip mask."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor


def resized_crop_params(
    b: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
    flip_p: float, generator: torch.Generator | None,
) -> ResizedCropParams:
    """torchvision's RandomResizedCrop.get_params, vectorised: 10 tries each, first valid wins,
    else the central crop clamped to the ratio range."""
    tries = 10
    area = h * w * (torch.rand((b, tries), generator=generator) * (scale[1] - scale[0]) + scale[0])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(torch.rand((b, tries), generator=generator) * (log_r[1] - log_r[0]) + log_r[0])
    cw = torch.sqrt(area * aspect).round().long()
    ch = torch.sqrt(area / aspect).round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(b, dtype=torch.long))
    cw = cw.gather(1, first[:, None]).squeeze(1)
    ch = ch.gather(1, first[:, None]).squeeze(1)
    # Fallback (no valid try): whole image clamped to the ratio range, centred.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    bad = ~ok.any(1)
    cw = torch.where(bad, torch.full_like(cw, fw), cw)
    ch = torch.where(bad, torch.full_like(ch, fh), ch)
    u = torch.rand((b, 2), generator=generator)
    top = (u[:, 0] * (h - ch + 1)).floor().long().clamp_max(h - ch)
    left = (u[:, 1] * (w - cw + 1)).floor().long().clamp_max(w - cw)
    top = torch.where(bad, (h - ch) // 2, top)
    left = torch.where(bad, (w - cw) // 2, left)
    flip = _rand(b, generator) < flip_p
    return ResizedCropParams(top=top, left=left, height=ch, width=cw, flip=flip)


def _linear_taps(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample [B], resizing the span [start, start + length) to `size` pixels as PyTorch's bilinear
    interpolate does on the cropped image (align_corners=False, no antialias): source position
    (j + 0.5) * length / size - 0.5, at least 0, between pixels `lower` and `upper` (clamped to the
    span) with weight `weight` on `upper`. Returns the three as [B,size], indices into the full image."""
    scale = length.float() / size
    src = ((torch.arange(size, dtype=torch.float32) + 0.5) * scale[:, None] - 0.5).clamp_min_(0)
    lower = src.floor()
    weight = src - lower
    lower = lower.long()
    upper = torch.minimum(lower + 1, length[:, None] - 1)
    return lower + start[:, None], upper + start[:, None], weight


def _resample_rows(x: Tensor, lower: Tensor, upper: Tensor, weight: Tensor, source: Tensor | None = None) -> Tensor:
    """[B,C,H,W] -> [R,C,S,W]: output row i of sample r is row lower[r,i] of sample source[r] (default
    r) blended with its row upper[r,i] by weight[r,i] ([R,S] each). Rows are whole memory lines, so
    each tap is one index_select over the flattened rows: a row copy, where a per-pixel gather costs
    10x more."""
    b, c, h, w = x.shape
    r, s, dev = lower.shape[0], lower.shape[1], x.device
    source = torch.arange(b) if source is None else source
    base = _on((source[:, None] * c + torch.arange(c)) * h, dev).view(r, c, 1)
    rows = x.reshape(b * c * h, w)
    out = rows.index_select(0, (base + _on(lower, dev)[:, None]).view(-1)).view(r, c, s, w)
    nxt = rows.index_select(0, (base + _on(upper, dev)[:, None]).view(-1)).view(r, c, s, w)
    return out.lerp_(nxt, _on(weight, dev).view(r, 1, s, 1))


def _crop_resize(x_t: Tensor, p: ResizedCropParams, size: int, source: Tensor | None = None) -> Tensor:
    """The resampling of random_resized_crop on float images given transposed ([B,C,W,H]): columns
    first (rows of x_t), then rows; the flip reverses each flipped sample's column taps. Box r is
    cut from image source[r] (default r), so several crops of one batch need no copy of it."""
    cols = _linear_taps(p.left, p.width, size)
    if p.flip.any():
        cols = tuple(torch.where(p.flip[:, None], t.flip(1), t) for t in cols)
    by_cols = _resample_rows(x_t, *cols, source=source)  # [R,C,S,H]: output column j, all source rows
    return _resample_rows(by_cols.transpose(2, 3), *_linear_taps(p.top, p.height, size))


def random_resized_crop(
    x: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    *,
    flip_p: float = 0.0,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, ResizedCropParams]:
    """Batched RandomResizedCrop (+ optional horizontal flip) with torchvision's resampling.

    Each sample's box is resized as torchvision's `resized_crop(..., antialias=False)` does it
    (separable bilinear, align_corners=False, edges clamped to the box, so no pixel outside the box
    leaks in; tests compare per sample). Like that, no antialiasing when shrinking a large crop;
    at CIFAR sizes crops are upsampled or near 1:1, where it does not matter.
    """
    b, _, h, w = x.shape
    p = resized_crop_params(b, h, w, scale, ratio, flip_p, generator)
    out = _like(_crop_resize(_as_float(x).transpose(2, 3), p, size), x)
    return (out, p) if return_params else out


# ---------------------------------------------------------------- colour
# The colour ops work in place on float [k,3,H,W] rows: a fresh full-size buffer costs page faults
# (measured: more than the arithmetic on CPU), so each op allocates only what it must.

def grayscale(x: Tensor) -> Tensor:
    """float [B,3,H,W] -> float [B,1,H,W] luma, with torchvision's weights and order of operations."""
    r, g, b = x.unbind(1)
    return torch.mul(r, _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _grayscale_rows_(x: Tensor, rows: Tensor) -> Tensor:
    """Replace RGB by its luma on all three channels of x[rows], in place (uint8: luma rounded)."""
    if rows.numel():
        rows = _on(rows, x.device)
        gray = _like(grayscale(_as_float(x.index_select(0, rows))), x)
        x.index_copy_(0, rows, gray.expand(-1, 3, -1, -1))
    return x


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """With probability p per sample, replace RGB by its luma on all three channels."""
    return _grayscale_rows_(x.clone(), (_rand(x.shape[0], generator) < p).nonzero().squeeze(1))


def _brightness_(x: Tensor, f: Tensor) -> Tensor:
    return x.mul_(f.view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast_(x: Tensor, f: Tensor) -> Tensor:
    """Blend with each image's mean luma (= the luma of its channel means: one small reduction)."""
    mean = x.mean((2, 3)) @ _const(_LUMA, x.device)  # [k]
    return x.mul_(f.view(-1, 1, 1, 1)).add_(((1 - f) * mean).view(-1, 1, 1, 1)).clamp_(0, 1)


def _saturation_(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the per-pixel luma, as torchvision: f * x + (1 - f) * gray, clamped."""
    gray = grayscale(x).mul_((1 - f).view(-1, 1, 1, 1))
    return x.mul_(f.view(-1, 1, 1, 1)).add_(gray).clamp_(0, 1)


def _shift_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by shift [k] (fraction of a turn), in place, with torchvision's HSV semantics.

    A hue rotation keeps V = max and C = max - min, so HSV->RGB reduces to a closed form:
    c_n = min + C * clamp(tri(6h' + n - 2) - 1, 0, 1), n = 5, 3, 1 for R, G, B, where tri is the
    distance to the nearest multiple of 6 (periodic, so no `mod`). The hue before the shift, in
    sextants, is 2i + (x[i+1] - x[i+2]) / C for a channel i holding the max. Where channels tie for
    the max their values are equal mod 6 (red/blue: -1 and 5) and the closed form is 6-periodic, so
    any max channel will do: the largest of 2 + that over the max channels, with no branches as in
    torchvision. Non-max channels are pushed below by 8 * sign(max - x) (float ops: a bool mask
    costs 5x more on CPU). About 20 tensor ops, most over all three channels at once: per-op
    dispatch is what costs at these sizes.
    """
    k = x.shape[0]
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma = maxc - minc
    inv = torch.clamp_min(chroma, 1e-20).reciprocal_()  # grays: every difference below is 0
    cand = torch.empty_like(x)  # per channel i: 2 + 2i + (x[i+1] - x[i+2]) / C, in [1, 7]
    for i in range(3):
        torch.sub(x[:, (i + 1) % 3], x[:, (i + 2) % 3], out=cand[:, i])
    cand.mul_(inv).add_(_const((2.0, 4.0, 6.0), x.device).view(1, 3, 1, 1))
    not_max = torch.sub(maxc, x).sign_()  # 1 where the channel is below the max, else 0
    h6 = cand.sub_(not_max, alpha=8).amax(1, keepdim=True)  # hue in sextants + 2, in [1, 7)
    # per sample and channel: the shift in sextants, the -2 above, and n - 2 for n = 5, 3, 1
    const = (shift.view(k, 1) * 6 - 2) + _const((3.0, 1.0, -1.0), x.device)
    t = torch.add(h6, const.view(k, 3, 1, 1), out=cand)  # [k,3,H,W], reusing the buffers
    near6 = torch.mul(t, 1 / 6, out=not_max).round_()
    t.sub_(near6, alpha=6).abs_().sub_(1).clamp_(0, 1).mul_(chroma)
    return torch.add(t, minc, out=x)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_, _shift_hue_)  # torchvision's fn_idx order


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    return _shift_hue_(x.clone(), shift)


@dataclass
class JitterParams:
    """Per-sample draws of color_jitter: whether it applies, the four factors, the order of the ops."""

    apply: Tensor  # bool [B]
    factors: Tensor  # float [B,4]: brightness, contrast, saturation, hue shift (torchvision's fn_idx order)
    order: Tensor  # int64 [B,4]: op index in each of the four slots

    @classmethod
    def draw(cls, b: int, strengths: Sequence[float], p: float, generator: torch.Generator | None) -> JitterParams:
        brightness, contrast, saturation, hue = strengths
        apply = _rand(b, generator) < p
        ranges = [(max(0.0, 1 - brightness), 1 + brightness), (max(0.0, 1 - contrast), 1 + contrast),
                  (max(0.0, 1 - saturation), 1 + saturation), (-hue, hue)]
        factors = torch.stack([_uniform(b, lo, hi, generator) for lo, hi in ranges], 1)
        return cls(apply, factors, torch.rand((b, 4), generator=generator).argsort(1))




def _color_jitter_(x: Tensor, params: JitterParams, strengths: Sequence[float]) -> Tensor:
    """color_jitter on float x, in place. The rows to jitter are gathered once, ordered by the op
    each runs in the first slot; before each later slot they are re-ordered by that slot's op, so
    every op runs once per slot on a contiguous slice; one index_copy_ puts them back."""
    enabled = [v > 0 for v in strengths]
    held = params.apply.nonzero().squeeze(1)  # which sample each row of `rows` holds, in the current order
    if not held.numel() or not any(enabled):
        return x
    dev, rows = x.device, None
    for slot in range(4):
        ops = params.order[held, slot]
        regroup = ops.argsort(stable=True)
        held, ops = held[regroup], ops[regroup]
        rows = x.index_select(0, _on(held, dev)) if rows is None else rows.index_select(0, _on(regroup, dev))
        start = 0
        for op, count in enumerate(torch.bincount(ops, minlength=4).tolist()):
            if count and enabled[op]:
                _JITTER_OPS[op](rows[start:start + count], _on(params.factors[held[start:start + count], op], dev))
            start += count
    return x.index_copy_(0, _on(held, dev), rows)


def color_jitter(
    x: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision ColorJitter semantics, applied with probability p per sample.

    Factors are per sample (brightness/contrast/saturation ~ U[max(0,1-v), 1+v], hue shift
    ~ U[-hue, hue]) and so is the order of the four ops: torchvision draws one random order
    per call, and the PIL pipelines call it once per image; so here each sample gets its own
    random permutation. Each op runs only on the samples that have it in that slot, so the work
    stays 4 ops per image. Samples not selected (rand >= p) are returned unchanged, bit for bit.
    """
    strengths = (brightness, contrast, saturation, hue)
    params = JitterParams.draw(x.shape[0], strengths, p, generator)
    xf = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
    return _like(_color_jitter_(xf, params, strengths), x)


# ---------------------------------------------------------------- SimCLR

def _cat_params(parts: list[Any]) -> Any:
    """Per-sample parameter dataclasses of several batches as one, field by field."""
    return type(parts[0])(*(torch.cat([getattr(q, f.name) for q in parts]) for f in fields(parts[0])))


def simclr_views(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    flip_p: float = 0.5,
) -> Tensor:
    """Two independently augmented, normalised views of each image (SimCLR CIFAR recipe; no blur at
    32 px), as one [2B,3,S,S] batch: rows 0..B-1 the first view of each image, then the second.

    Bit for bit what random_resized_crop (+ flip), color_jitter, random_grayscale and normalize
    give, called in turn for one view and then the other with the same generator (tested). Faster:
    both views' parameters are drawn first, then each op runs once over all 2B rows, in place, with
    the images transposed once (per-op dispatch and fresh buffers are what cost on CPU here). It is
    engine/data/views.py's pipeline with two equal specs and no blur or solarisation.
    """
    from engine.data.views import ViewSpec, view_groups  # views builds on this module

    spec = ViewSpec(size, crop_scale, crop_ratio, flip_p, tuple(jitter), jitter_p, gray_p)  # type: ignore[arg-type]
    ((_, both),) = view_groups(x, generator, (spec, spec), mean, std)  # one group: both views, 2B rows
    return both
