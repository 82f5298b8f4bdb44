"""Pure functions behind SimCLR, the kNN monitor and MixMatch, tested against hand computations.

Nothing here holds state or reads a recipe: each function is the formula from its paper,
so tests can check it on a few numbers and the method modules stay about the loop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------- SimCLR


def world_size() -> int:
    """Processes in the torchrun job (1 outside one)."""
    return _world()[1]


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the gathered rows (all_reduce)
    and hands each rank the slice of its own rows: the negatives of other ranks stay differentiable."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: Tensor) -> Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(z: Tensor) -> Tensor:
    """All ranks' rows concatenated in rank order (every rank must pass the same shape: drop_last),
    differentiable; the input itself in a single process."""
    if _world()[1] == 1:
        return z
    return _GatherWithGrad.apply(z)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """NT-Xent (SimCLR) for two views: (loss, logits, positive indices).

    Queries are this rank's 2N embeddings (rows 0..N-1 view 1, N..2N-1 view 2). Keys are the
    embeddings of every rank (the global batch of 2NW under DDP, gathered with gradients), laid
    out as [view 1 of all ranks, view 2 of all ranks]. Each query's own similarity is masked out
    and its positive is the other view of the same image; the loss is the mean over queries of
    cross-entropy on cosine similarity / temperature. In one process this is the usual 2N x 2N
    formulation exactly. `gather=False` keeps the negatives local (evaluation, where ranks hold
    different numbers of rows and must not enter a collective).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"views must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    rank, world = _world() if gather else (0, 1)
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0) if world > 1 else torch.cat([z1, z2])
    queries = torch.cat([z1, z2], dim=0)  # [2N, D]
    logits = queries @ keys.T / temperature
    mine = torch.arange(n, device=z1.device) + rank * n  # this rank's images in view-1 key order
    self_index = torch.cat([mine, mine + n * world])
    positive = torch.cat([mine + n * world, mine])
    rows = torch.arange(2 * n, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_index] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive), logits.detach(), positive


class ProjectionHead(nn.Sequential):
    """SimCLR's MLP g(.): Linear -> ReLU -> Linear (hidden 0: a single Linear)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        if hidden_dim:
            super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        else:
            super().__init__(nn.Linear(in_dim, out_dim))


@torch.no_grad()
def knn_predict(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk: int = 1024) -> Tensor:
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar bank rows vote exp(sim / T)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for part in F.normalize(query.float(), dim=1).split(chunk):
        sim, index = (part @ bank.T).topk(k, dim=1)
        votes = torch.zeros(part.shape[0], num_classes, device=part.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[index], (sim / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=query.device)


# ---------------------------------------------------------------- MixMatch


def guess_labels(logits_per_view: list[Tensor]) -> Tensor:
    """MixMatch label guess: the mean over the K augmentations of the softmax predictions."""
    return torch.stack([F.softmax(logits.float(), dim=1) for logits in logits_per_view]).mean(dim=0)


def sharpen(probs: Tensor, temperature: float = 0.5) -> Tensor:
    """p_i^(1/T) / sum_j p_j^(1/T), row-wise."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def sample_mix_lambda(alpha: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda) so the mix stays closer to its
    first input. torch samples Beta only from the global RNG, so the draw uses a numpy generator
    seeded from `generator`: the same trainer generator state gives the same lambda."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """lam * (x, y) + (1 - lam) * (x, y)[perm]: inputs and soft targets mixed with the same pairs."""
    perm = perm.to(x.device)  # index_select copies whole rows: 10x faster than x[perm] on CPU
    return lam * x + (1 - lam) * x.index_select(0, perm), lam * y + (1 - lam) * y.index_select(0, perm)


def _interleave_offsets(batch: int, groups: int) -> list[int]:
    sizes = [batch // groups] * groups
    for i in range(batch - sum(sizes)):
        sizes[-i - 1] += 1
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def interleave(chunks: list[Tensor], batch: int) -> list[Tensor]:
    """Swap the i-th slice of chunk 0 with the i-th slice of chunk i (MixMatch's interleave).

    Every one of the 1 + K forward passes then holds labelled and unlabelled rows (pass 0 a slice
    of each chunk), so no batch-norm statistic is computed on labelled rows alone. Applying it twice restores the
    original order, which is how the logits are put back.
    """
    offsets = _interleave_offsets(batch, len(chunks))
    parts = [[c[offsets[p]:offsets[p + 1]] for p in range(len(chunks))] for c in chunks]
    for i in range(1, len(chunks)):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p, dim=0) for p in parts]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Lx: mean over rows of -sum_c target_c * log softmax(logits)_c."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def probability_mse(logits: Tensor, targets: Tensor) -> Tensor:
    """Lu: mean squared error between softmax(logits) and the targets, over rows and classes
    (the paper's 1 / (L |U'|) sum ||q - p||^2)."""
    return (F.softmax(logits.float(), dim=1) - targets).pow(2).mean()


def linear_rampup(step: int, length: int) -> float:
    """0 at step 0, rising linearly to 1 at `length` steps, 1 after; length 0 means no ramp."""
    if length <= 0:
        return 1.0
    return float(min(max(step / length, 0.0), 1.0))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model over every floating-point tensor of the state
    (parameters and batch-norm running statistics); integer buffers are copied."""
    model_state = model.state_dict()
    for name, value in ema.state_dict().items():
        source = model_state[name].detach()
        if value.dtype.is_floating_point:
            value.mul_(decay).add_(source, alpha=1 - decay)
        else:
            value.copy_(source)
