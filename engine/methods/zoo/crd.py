"""`crd`: contrastive representation distillation (Tian et al., ICLR 2020, "Contrastive
Representation Distillation").

Student and teacher pooled features feat[-1] go through their own embedding (Linear + L2
normalisation, both trainable) into a feat_dim space. Two memory banks hold one embedding per
training row: the student bank and the teacher bank. For every anchor, 1 + K rows are drawn
(column 0 the positive, then K negatives) and scored against the other side's bank,

    P(i | v) = exp(v . m_i / T) / Z

with Z the normalisation constant estimated once, on the first batch, as mean(exp(v . m / T)) *
n_data. The NCE loss (ContrastLoss) of each side is

    -( log P_pos / (P_pos + K Pn) + sum_k log K Pn / (P_k + K Pn) )   averaged over anchors,

Pn = 1 / n_data, and the method's loss is student-anchor + teacher-anchor. After the step the
banks move towards this batch's embeddings: m_i <- normalize(nce_m m_i + (1 - nce_m) v_i).

Which rows are drawn (dataset/cifar100.py, CIFAR100InstanceSample): negatives are rows of the
other classes, without replacement unless the anchor's class leaves fewer than K; the positive
is the anchor's own row ('exact') or a random row of its class ('relax'). They come from the
trainer's generator (a seed drawn from it drives a device generator), so a resumed run draws the
same rows. The banks and Z are buffers of the "memory" module, so checkpoints carry them.

Under torchrun each rank's loss uses its own rows, its own draws and the shared banks (the
trainer's gradient sum then gives the global-batch mean); the bank update all_gathers every
rank's detached embeddings and indices, and Z is estimated over every rank's first batch, so
all ranks keep identical banks.

Scores are computed as v @ bank^T followed by a gather of the drawn columns: the same numbers as
the reference's gather-then-bmm, without the (B, 1 + K, feat_dim) copy of the bank rows.

Defaults (HobbitLong/RepDistiller): feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, mode
'exact' (train_student.py); the banks' uniform init in +-1/sqrt(feat_dim / 3), Z and the update
rule (crd/memory.py, ContrastMemory); eps 1e-7 and the loss (crd/criterion.py, ContrastLoss,
Embed); beta 0.8 (scripts/run_cifar_distill.sh, `--distill crd -a 0 -b 0.8`; CRD+KD is `-a 1`,
here distill.kd_weight = 1).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.methods.base import StepOutput
from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features

NCE_EPS = 1e-7  # crd/criterion.py


class Embed(nn.Module):
    """Linear + L2 normalisation (in fp32 whatever the autocast dtype: the scores divide by T = 0.07)."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def contrast_loss(scores: Tensor, n_data: int) -> Tensor:
    """NCE loss of (B, 1 + K) normalised scores, column 0 the positive, noise K / n_data."""
    noise = (scores.shape[1] - 1) / n_data
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + NCE_EPS))
    log_d0 = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_rows(x: Tensor) -> Tensor:
    """Every rank's rows of `x` (no gradient) in rank order; ranks may hold different numbers."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


class ContrastSampler:
    """Draws, for each anchor row, 1 + k rows of the training split: the positive, then k negatives
    of other classes (with replacement only where the anchor's class leaves fewer than k)."""

    def __init__(self, train_labels: Tensor, k: int, mode: str = "exact") -> None:
        self.labels, self.k, self.mode = train_labels, k, mode
        self.order = torch.argsort(train_labels, stable=True)  # rows grouped by class
        counts = torch.bincount(train_labels)
        self.counts, self.starts = counts, counts.cumsum(0) - counts
        pools = (train_labels.numel() - counts)[counts > 0]  # negatives available to each class
        if not bool((pools > 0).all()):
            raise ValueError("crd: the training split holds a single class, so there are no negatives to draw")
        self.some_replace, self.some_distinct = bool((pools < k).any()), bool((pools >= k).any())

    def __call__(self, indices: Tensor, generator: torch.Generator) -> Tensor:
        device = self.labels.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        g = torch.Generator(device=device).manual_seed(seed)
        labels = self.labels[indices]
        n_class, start = self.counts[labels], self.starts[labels]
        b, n = labels.numel(), self.labels.numel()
        pool = n - n_class
        if self.some_distinct:  # k distinct rows: the k smallest random keys, own class keyed out
            keys = torch.rand(b, n, generator=g, device=device, dtype=torch.float64)  # fp64: no ties
            keys.masked_fill_(self.labels[None, :] == labels[:, None], 2.0)
            distinct = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        if self.some_replace:  # uniform positions in the class-sorted order, the own class's block skipped
            u = (torch.rand(b, self.k, generator=g, device=device, dtype=torch.float64) * pool[:, None]).long()
            u = torch.minimum(u, (pool - 1)[:, None])
            drawn = self.order[u + n_class[:, None] * (u >= start[:, None])]
        if self.some_replace and self.some_distinct:
            negatives = torch.where((pool < self.k)[:, None], drawn, distinct)
        else:
            negatives = drawn if self.some_replace else distinct
        if self.mode == "exact":
            positive = indices
        else:  # relax: any row of the anchor's class
            pick = (torch.rand(b, generator=g, device=device, dtype=torch.float64) * n_class).long()
            positive = self.order[start + torch.minimum(pick, n_class - 1)]
        return torch.cat([positive[:, None], negatives], dim=1)


class ContrastMemory(nn.Module):
    """The two momentum memory banks over the training rows and their normalisation constants."""

    def __init__(self, feat_dim: int, n_data: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        self.n_data, self.temperature, self.momentum = n_data, temperature, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative: not estimated yet
        self._z_known: bool | None = None  # host-side cache of z > 0, so steps need no device sync
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_z_known", None))

    def forward(self, v_s: Tensor, v_t: Tensor, contrast: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised scores (B, 1 + K): the student anchors against the teacher bank's drawn rows,
        and the teacher anchors against the student bank's."""
        with torch.autocast(v_s.device.type, enabled=False):
            out_s = self._scores(v_s, self.memory_t, contrast)
            out_t = self._scores(v_t, self.memory_s, contrast)
        if not self._z_known:
            self._z_known = bool((self.z > 0).all())
        if not self._z_known:
            self._estimate_z(out_s.detach(), out_t.detach())
            self._z_known = True
        return out_s / self.z[0], out_t / self.z[1]

    def _scores(self, v: Tensor, bank: Tensor, contrast: Tensor) -> Tensor:
        """exp(v_b . bank[contrast[b, j]] / T), as v @ bank^T read at the drawn columns."""
        return torch.exp(torch.gather(v.to(bank.dtype) @ bank.T, 1, contrast) / self.temperature)

    @torch.no_grad()
    def _estimate_z(self, out_s: Tensor, out_t: Tensor) -> None:
        """Z = mean score of the first batch (every rank's, under torchrun) times n_data."""
        totals = torch.stack([out_s.sum(), out_t.sum(), torch.tensor(float(out_s.numel()), device=out_s.device)])
        if _distributed():
            dist.all_reduce(totals)
        self.z.copy_(totals[:2] / totals[2] * self.n_data)

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, indices: Tensor) -> None:
        """m_i <- normalize(momentum * m_i + (1 - momentum) * v_i) for the rows of every rank."""
        d = v_s.shape[1]
        rows = all_rows(torch.cat([v_s.double(), v_t.double(), indices.double()[:, None]], dim=1))
        v_s, v_t, indices = rows[:, :d], rows[:, d:2 * d], rows[:, 2 * d].long()
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            mixed = bank[indices] * self.momentum + v.to(bank.dtype) * (1 - self.momentum)
            bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


class CRD(FeatureDistill):
    default_feature_weight = 0.8

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        cfg = self.recipe.distill.crd
        train_labels = self.data.train.labels.to(self.device)
        self.sampler = ContrastSampler(train_labels, cfg.nce_k, cfg.mode)
        self._contrast: Tensor | None = None  # this step's drawn rows (train_step -> feature_loss)
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None  # this step's bank update
        return nn.ModuleDict({
            "embed_s": Embed(student.as_list()[-1].shape[1], cfg.feat_dim),
            "embed_t": Embed(teacher.as_list()[-1].shape[1], cfg.feat_dim),
            "memory": ContrastMemory(cfg.feat_dim, len(train_labels), cfg.nce_t, cfg.nce_m),
        })

    @property
    def memory(self) -> ContrastMemory:
        return self.distill_modules["memory"]

    def train_step(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                   indices: Tensor | None = None) -> StepOutput:
        if indices is None:
            raise ValueError("crd: train_step needs each row's index into the training split (its memory bank)")
        self._contrast = self.sampler(indices, generator) if self.feature_weight else None
        return super().train_step(images, labels, generator, indices)

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        if self._contrast is None or indices is None:
            raise RuntimeError("crd: feature_loss is reached through train_step, which draws the contrast rows")
        v_s = self.distill_modules["embed_s"](student.as_list()[-1])
        v_t = self.distill_modules["embed_t"](teacher.as_list()[-1])
        out_s, out_t = self.memory(v_s, v_t, self._contrast)
        self._pending = (v_s.detach(), v_t.detach(), indices)
        n = self.memory.n_data
        return contrast_loss(out_s, n) + contrast_loss(out_t, n)

    def after_optimizer_step(self, step: int) -> None:
        """The bank update, after backward: the scores' backward reads the banks it would overwrite."""
        if self._pending is not None:
            self.memory.update(*self._pending)
            self._pending = None
