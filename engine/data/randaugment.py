"""FixMatch's strong augmentation: RandAugment with a random op and magnitude per image, then Cutout,
batched on uint8 tensors.

The variant is kekmodel/FixMatch-pytorch dataset/randaugment.py `RandAugmentMC(n=2, m=10)` (as
google-research/fixmatch libml/augment.py `AugmentPoolRAMC` draws it): per image, n ops chosen with
replacement from the 14 of `fixmatch_augment_pool`, each with its own level ~ randint(1, m) (1..9 of
PARAMETER_MAX 10) and applied with probability 0.5; rotate, shear and translate take a random sign;
then Cutout always. Magnitudes for level v (kekmodel's table, the FixMatch paper's Table 12 ranges):
brightness, color, contrast, sharpness factor 0.09 v + 0.05; posterize to int(0.4 v) + 4 bits; rotate
int(3 v) degrees; shear 0.03 v; solarize threshold 256 - int(25.6 v); translate int(0.03 v * size) px.
Cutout: a size x size box of gray 127 (kekmodel's CutoutAbs colour) with size = int(0.5 * image side)
(16 at 32 px: kekmodel's CutoutAbs(img, 16), google-research's cutout_numpy default), its top-left at
int(max(0, c - size / 2)) for a centre c ~ U[0, side), clipped at the far edges. kekmodel draws it with
PIL's inclusive rectangle, 17 px; this box is 16. TorchSSL / USB (microsoft/Semi-supervised-learning
semilearn/datasets/augmentation/randaugment.py) differ: 3 ops always applied, continuous magnitudes,
a random Cutout size in [0, 0.5]; not followed here.

Each op is torchvision.transforms.v2.functional's op on uint8 tensors (tests compare per sample), which
follow PIL's: adjust_brightness / adjust_saturation (Color) / adjust_contrast / adjust_sharpness,
autocontrast, equalize, posterize, solarize, and affine / rotate with nearest interpolation and fill 0
(PIL's transform fills black; the references pass no fill). Shears are about the top-left corner
(torchvision's `center=[0, 0]`) as PIL's Image.transform does; rotation is about the centre, as
Image.rotate. Translation is torchvision's sign: +t moves the content by +t (PIL's coefficient is -t;
the sign is random either way). All per-sample parameters are drawn first on the CPU from one
generator; then, op slot by op slot, each op runs once on the rows that drew it (index_select /
index_copy_), and the five geometric ops share one affine grid with a matrix per row. Images stay uint8
between ops, as PIL images do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.data.augment import _LUMA, _const, _on

OPS = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate",
       "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")  # kekmodel's pool order
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PARAMETER_MAX = 10


@dataclass
class RandAugmentParams:
    """Per-sample draws: op index and level per slot, whether each slot applies, signs, Cutout centre."""

    op: Tensor  # int64 [B,N], index into OPS
    level: Tensor  # int64 [B,N], 1..magnitude-1
    apply: Tensor  # bool [B,N]
    negate: Tensor  # bool [B,N]: the sign of rotate / shear / translate
    centre: Tensor  # float [B,2]: Cutout centre (y, x) in pixels

    @classmethod
    def draw(cls, b: int, n: int, magnitude: int, h: int, w: int,
             generator: torch.Generator | None) -> RandAugmentParams:
        op = torch.randint(0, len(OPS), (b, n), generator=generator)
        level = torch.randint(1, magnitude, (b, n), generator=generator)
        apply = torch.rand((b, n), generator=generator) < 0.5
        negate = torch.rand((b, n), generator=generator) < 0.5
        centre = torch.rand((b, 2), generator=generator) * torch.tensor([float(h), float(w)])
        return cls(op, level, apply, negate, centre)


def op_values(op: str, level: Tensor, negate: Tensor, h: int, w: int) -> Tensor:
    """float64 [k]: the torchvision argument of `op` at these levels (factor, bits, threshold, degrees
    of rotation or shear, or pixels of translation: of the width for x, the height for y), with
    kekmodel's formulas."""
    v = level.double()
    sign = 1 - 2 * negate.double()
    if op in ("brightness", "color", "contrast", "sharpness"):
        return (v * 0.9 / PARAMETER_MAX + 0.05).float().double()  # float32, as the ops compute
    if op == "posterize":
        return (level * 4 // PARAMETER_MAX + 4).double()
    if op == "solarize":
        return (256 - level * 256 // PARAMETER_MAX).double()
    if op == "rotate":
        return (level * 30 // PARAMETER_MAX).double() * sign
    if op in ("shear_x", "shear_y"):
        return torch.rad2deg(torch.atan(v * 0.3 / PARAMETER_MAX)) * sign
    if op in ("translate_x", "translate_y"):
        return (v * 0.3 / PARAMETER_MAX * (w if op == "translate_x" else h)).trunc() * sign
    return torch.zeros_like(v)


# ---------------------------------------------------------------- colour ops: uint8 [k,3,H,W] -> uint8

def _f(values: Tensor, device: torch.device) -> Tensor:
    return _on(values.float().view(-1, 1, 1, 1), device)


def _gray_floor(x: Tensor) -> Tensor:
    """torchvision's luma of a uint8 image, as float, rounded down (its adjust_saturation / contrast)."""
    r, g, b = x.float().unbind(1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1).floor_()


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clamped, truncated to uint8 (torchvision's _blend): 1 - factor
    in float64 first, as torchvision's Python float, and one fused multiply-add (addcmul_, as its
    add_(other, alpha=...)): a separate multiply and add rounds twice and misses by 1 on ~1e-4 of pixels."""
    rest = _f((1 - factor.float().double()), x.device)
    return x.float().mul_(_f(factor, x.device)).addcmul_(other.expand_as(x), rest).clamp_(0, 255).to(torch.uint8)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    return x.float().mul_(_f(factor, x.device)).clamp_(0, 255).to(torch.uint8)


def color(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray_floor(x), factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray_floor(x).mean((1, 2, 3), keepdim=True), factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the 3x3 smoothing (1s around a 5, / 13) of the interior, rounded; edges unchanged."""
    k, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    kernel = _const((1 / 13,) * 4 + (5 / 13,) + (1 / 13,) * 4, x.device)
    out = x.float()
    smooth = F.conv2d(out.view(k * c, 1, h, w), kernel.view(1, 1, 3, 3)).view(k, c, h - 2, w - 2).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(smooth.sub_(inner), _f(1 - factor.float().double(), x.device))
    return out.clamp_(0, 255).to(torch.uint8)


def autocontrast(x: Tensor, _: Tensor | None = None) -> Tensor:
    """Stretch each channel to [0, 255]; constant channels unchanged."""
    xf = x.float()
    lo, hi = xf.amin((2, 3), keepdim=True), xf.amax((2, 3), keepdim=True)
    flat = hi == lo  # torch.where, not masked assignment: no host sync on CUDA
    inv_scale = torch.where(flat, 1.0, hi.sub_(lo).mul_(1.0 / 255))
    return xf.sub_(torch.where(flat, 0.0, lo)).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def equalize(x: Tensor, _: Tensor | None = None) -> Tensor:
    """PIL's histogram equalisation per channel (torchvision's port of its lookup table)."""
    k, c, h, w = x.shape
    flat = x.reshape(k * c, h * w).long()
    hist = torch.zeros(k * c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    cum = hist.cumsum(1, dtype=torch.int32)
    last = cum.argmax(1, keepdim=True)  # the last non-empty bin
    step = (h * w - hist.gather(1, last)).div_(255, rounding_mode="floor")
    lut = cum[:, :-1].add(step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255).to(torch.uint8)
    lut = torch.cat([lut.new_zeros(k * c, 1), lut], 1)
    out = lut.gather(1, flat).view(k, c, h, w)
    return torch.where((step != 0).view(k, c, 1, 1), out, x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits of each value."""
    b = bits.long()
    mask = (((1 << b) - 1) << (8 - b)).to(torch.uint8)
    return x & _on(mask.view(-1, 1, 1, 1), x.device)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert values >= threshold."""
    t = _on(threshold.view(-1, 1, 1, 1).to(torch.int16), x.device)
    return torch.where(x.to(torch.int16) >= t, x.bitwise_not(), x)


COLOUR_OPS = {"autocontrast": autocontrast, "brightness": brightness, "color": color, "contrast": contrast,
              "equalize": equalize, "posterize": posterize, "sharpness": sharpness, "solarize": solarize}


# ---------------------------------------------------------------- geometric ops: one affine grid

def inverse_affine(op: str, values: Tensor, h: int, w: int) -> Tensor:
    """float64 [k,2,3]: torchvision's _get_inverse_affine_matrix for each row's op, vectorised."""
    k = values.shape[0]
    zero = torch.zeros(k, dtype=torch.float64)
    angle, tx, ty, sx, sy = zero, zero, zero, zero, zero
    if op == "rotate":  # rotate() passes -angle, about the centre
        angle = -values
    elif op == "shear_x":
        sx = values
    elif op == "shear_y":
        sy = values
    elif op == "translate_x":
        tx = values
    elif op == "translate_y":
        ty = values
    # rotate about the image centre; shear and translate about pixel (0, 0) (torchvision's RandAugment)
    cx, cy = (0.0, 0.0) if op == "rotate" else (-w * 0.5, -h * 0.5)
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(sx), torch.deg2rad(sy)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m = torch.stack([d, -b, zero, -c, a, zero], 1)
    m[:, 2] += cx - m[:, 0] * (cx + tx) - m[:, 1] * (cy + ty)
    m[:, 5] += cy - m[:, 3] * (cx + tx) - m[:, 4] * (cy + ty)
    return m.view(k, 2, 3)


def affine_nearest(x: Tensor, matrices: Tensor) -> Tensor:
    """uint8 [k,C,H,W], one inverse matrix per row [k,2,3] -> uint8: torchvision's affine grid (float32)
    and nearest grid_sample with zero fill, for all rows in one call."""
    k, _, h, w = x.shape
    dev = x.device
    theta = _on(matrices.float(), dev)
    base = torch.empty(1, h, w, 3, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(_const((0.5 * w, 0.5 * h), dev))
    grid = base.view(1, h * w, 3).expand(k, -1, -1).bmm(rescaled).view(k, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


# ---------------------------------------------------------------- the whole strong view

def cutout_boxes(centre: Tensor, h: int, w: int, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top, left, bottom, right) [B] int64, bottom/right exclusive: kekmodel's CutoutAbs box, 16 wide."""
    top = (centre[:, 0] - size / 2).clamp_min(0).long()
    left = (centre[:, 1] - size / 2).clamp_min(0).long()
    return top, left, (top + size).clamp_max(h), (left + size).clamp_max(w)


def cutout(x: Tensor, boxes: tuple[Tensor, Tensor, Tensor, Tensor], fill: int = 127) -> Tensor:
    top, left, bottom, right = (_on(t, x.device) for t in boxes)
    ys = torch.arange(x.shape[2], device=x.device)
    xs = torch.arange(x.shape[3], device=x.device)
    inside_y = (ys >= top[:, None]) & (ys < bottom[:, None])  # [B,H]
    inside_x = (xs >= left[:, None]) & (xs < right[:, None])  # [B,W]
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)
    return x.masked_fill(inside, fill)


def randaugment(
    x: Tensor,
    generator: torch.Generator | None = None,
    n: int = 2,
    magnitude: int = 10,
    cutout_fraction: float = 0.5,
    *,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, RandAugmentParams]:
    """uint8 [B,3,H,W] -> uint8: RandAugmentMC(n, magnitude) + Cutout(int(cutout_fraction * min(H, W)))
    per image, each image its own ops, levels, signs and box. cutout_fraction 0: no Cutout."""
    if x.dtype != torch.uint8:
        raise TypeError(f"randaugment works on uint8 images, got {x.dtype}")
    if not 2 <= magnitude <= PARAMETER_MAX:
        raise ValueError(f"magnitude must be in 2..{PARAMETER_MAX} (levels are drawn from 1..magnitude-1)")
    b, _, h, w = x.shape
    p = RandAugmentParams.draw(b, n, magnitude, h, w, generator)
    out = x.clone()
    identity = OPS.index("identity")
    for slot in range(n):
        ops = torch.where(p.apply[:, slot], p.op[:, slot], identity)
        geo_rows, geo_mats = [], []
        for index, name in enumerate(OPS):
            rows = (ops == index).nonzero().squeeze(1)
            if name == "identity" or not rows.numel():
                continue
            values = op_values(name, p.level[rows, slot], p.negate[rows, slot], h, w)
            if name in GEOMETRIC:
                geo_rows.append(rows)
                geo_mats.append(inverse_affine(name, values, h, w))
                continue
            dev_rows = _on(rows, x.device)
            out.index_copy_(0, dev_rows, COLOUR_OPS[name](out.index_select(0, dev_rows), values))
        if geo_rows:
            dev_rows = _on(torch.cat(geo_rows), x.device)
            out.index_copy_(0, dev_rows, affine_nearest(out.index_select(0, dev_rows), torch.cat(geo_mats)))
    size = int(cutout_fraction * min(h, w))
    if size > 0:
        out = cutout(out, cutout_boxes(p.centre, h, w, size))
    return (out, p) if return_params else out


def strong_view_ops(params: RandAugmentParams, index: int, h: int, w: int) -> list[tuple[str, float]]:
    """The (op, torchvision argument) sequence image `index` received, for tests and inspection."""
    seq = []
    for slot in range(params.op.shape[1]):
        if params.apply[index, slot]:
            name = OPS[int(params.op[index, slot])]
            value = op_values(name, params.level[index, slot:slot + 1], params.negate[index, slot:slot + 1], h, w)
            seq.append((name, float(value[0])))
    return seq

