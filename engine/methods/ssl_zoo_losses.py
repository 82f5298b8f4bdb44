"""Pure functions behind the self-supervised zoo (BYOL, SimSiam, MoCo, Barlow Twins, VICReg, DINO).

Each is its paper's formula as the reference code computes it (sources named per function), so
tests can check it on a few hand-computed numbers; the method modules keep only their networks.

Under torchrun, the functions that need the global batch take `gather`: Barlow Twins' and
VICReg's statistics are computed on every rank's rows gathered *with* gradients (ssl_losses'
gather_with_grad), so the loss and its gradient equal one process on the whole batch; MoCo's
keys and DINO's centre are gathered / averaged without gradients (they are targets, not outputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from engine.methods.ssl_losses import _world, gather_with_grad

# ---------------------------------------------------------------- distributed helpers


@torch.no_grad()
def gather_no_grad(z: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, detached (MoCo's keys); z itself in one process."""
    if _world()[1] == 1:
        return z.detach()
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())
    return torch.cat(parts)


@torch.no_grad()
def global_row_mean(z: Tensor) -> Tensor:
    """Mean over the rows of every rank, detached (DINO's batch centre): [1, D]."""
    total = z.detach().sum(dim=0, keepdim=True)
    rows = torch.tensor(float(len(z)), device=z.device)
    if _world()[1] > 1:
        dist.all_reduce(total)
        dist.all_reduce(rows)
    return total / rows


# ---------------------------------------------------------------- momentum targets


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """tau_k = final - (final - base) (cos(pi k / K) + 1) / 2: base at step 0, final at K
    (BYOL, Grill et al. 2020, eq. in sec. 3.2; solo-learn solo/utils/momentum.py MomentumUpdater)."""
    if total_steps <= 0:
        return final
    k = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * k / total_steps) + 1) / 2


@torch.no_grad()
def ema_parameters_(target: Iterable[Tensor], online: Iterable[Tensor], tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, in place, parameter by parameter."""
    target, online = list(target), [p.detach() for p in online]
    if len(target) != len(online):
        raise ValueError(f"{len(target)} target tensors for {len(online)} online ones")
    torch._foreach_mul_(target, tau)
    torch._foreach_add_(target, online, alpha=1 - tau)


# ---------------------------------------------------------------- BYOL and SimSiam


def normalized_regression(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's 2 - 2 cos(p, z) averaged over rows; z is a target: no gradient reaches it
    (solo-learn solo/losses/byol.py byol_loss_func)."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()


def byol_loss(predictions: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Sum over target views i and prediction views j != i of normalized_regression(p_j, z_i):
    with two views the symmetric l(p2, z1) + l(p1, z2) (solo-learn solo/methods/byol.py)."""
    return sum(normalized_regression(p, z) for i, z in enumerate(targets)
               for j, p in enumerate(predictions) if j != i)  # type: ignore[return-value]


@torch.no_grad()
def normalized_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the batch std of L2-normalised embeddings: near 0 means collapse,
    about 1 / sqrt(D) healthy (SimSiam sec. 4.1; solo-learn logs it as train_z_std)."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)) averaged over rows (solo-learn solo/losses/simsiam.py)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """D(p1, z2) / 2 + D(p2, z1) / 2 (Chen & He 2021, Algorithm 1)."""
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


# ---------------------------------------------------------------- MoCo v2+


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """[N, 1 + K] logits / T: column 0 the positive q_n . k_n, then q_n . queue_j in queue order.
    q and k are L2-normalised [N, D], queue is [K, D] (rows are past keys); k is detached."""
    positive = (q * k.detach()).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().T
    return torch.cat([positive, negative], dim=1) / temperature


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE: cross-entropy with the positive at index 0 (solo-learn solo/losses/mocov2plus.py)."""
    logits = moco_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue_(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    """Write keys [..., N, D] into queue [..., K, D] from row `pointer` on, wrapping past the end
    (FIFO: the oldest keys are replaced), and advance the pointer ([1] long tensor) in place.
    Leading dimensions (MoCo v2+'s one queue per view) share the pointer."""
    size, n = queue.shape[-2], keys.shape[-2]
    if n > size:
        raise ValueError(f"{n} keys do not fit a queue of {size}")
    rows = (int(pointer) + torch.arange(n, device=queue.device)) % size
    queue.index_copy_(queue.dim() - 2, rows, keys.to(queue.dtype))
    pointer.fill_((int(pointer) + n) % size)


# ---------------------------------------------------------------- Barlow Twins


def off_diagonal(m: Tensor) -> Tensor:
    """The d(d - 1) off-diagonal entries of a square matrix, flattened (facebookresearch/barlowtwins main.py)."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """(z - mean) / sqrt(var + eps) per feature over the batch, biased variance: BatchNorm1d(affine=False)
    in training mode, as the reference normalises before the cross-correlation."""
    mean = z.mean(dim=0, keepdim=True)
    var = (z - mean).pow(2).mean(dim=0, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: Tensor, z2: Tensor, gather: bool = True) -> Tensor:
    """C_ij = sum_b z1n_bi z2n_bj / N of the batch-standardised embeddings, over the global batch."""
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    return batch_standardize(z1).T @ batch_standardize(z2) / z1.shape[0]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lamb: float = 0.0051, scale_loss: float = 0.1,
                      gather: bool = True) -> Tensor:
    """scale * (sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2) (Zbontar et al. 2021, eq. 1;
    solo-learn solo/losses/barlow.py, whose scale_loss multiplies the whole sum)."""
    c = cross_correlation(z1, z2, gather)
    on_diagonal = (1 - c.diagonal()).pow(2).sum()
    return scale_loss * (on_diagonal + lamb * off_diagonal(c).pow(2).sum())


# ---------------------------------------------------------------- VICReg


def variance_term(z: Tensor, eps: float = 1e-4) -> Tensor:
    """mean_j relu(1 - sqrt(Var(z_j) + eps)), unbiased variance (Bardes et al. 2022, eq. 1)."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: Tensor) -> Tensor:
    """sum_{i != j} Cov(z)_ij^2 / D, covariance with 1 / (N - 1) (Bardes et al. 2022, eq. 4)."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_terms(z1: Tensor, z2: Tensor, eps: float = 1e-4, gather: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(invariance, variance, covariance): the mean squared error of this rank's pairs; the variance
    and covariance terms of both views summed, on the global batch gathered with gradients (as the
    reference gathers: facebookresearch/vicreg main_vicreg.py, solo-learn solo/losses/vicreg.py)."""
    invariance = F.mse_loss(z1, z2)
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    variance = variance_term(z1, eps) + variance_term(z2, eps)
    covariance = covariance_term(z1) + covariance_term(z2)
    return invariance, variance, covariance


# ---------------------------------------------------------------- DINO


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """The teacher temperature of a 0-based epoch: linear from warmup_temp to temp over the first
    warmup_epochs (np.linspace's end points), then temp (facebookresearch/dino main_dino.py DINOLoss)."""
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float) -> Tensor:
    """Mean over (teacher view i, student view j != i) of the cross-entropy between the centred,
    sharpened teacher softmax((t_i - c) / T_t) (a target: detached) and softmax(s_j / T_s).
    The teacher sees the global views only (the first len(teacher) student views are the same images)."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [(-q * log_p).sum(dim=-1).mean() for i, q in enumerate(targets)
             for j, log_p in enumerate(log_probs) if j != i]
    if not terms:
        raise ValueError("DINO needs at least two views")
    return torch.stack(terms).mean()


@torch.no_grad()
def target_entropy(teacher: Sequence[Tensor], center: Tensor, teacher_temp: float) -> Tensor:
    """Mean entropy of DINO's teacher targets over ln K, in [0, 1]: the collapse monitor. Near 1 the
    targets are uniform (centring won: the student follows them to the uniform output and the loss sits
    at ln K); near 0 every row picks one prototype (sharpening won). DINO sec. 5.3 / fig. 7 watch the
    same two failure modes through the target entropy and the KL between teacher and student."""
    q = F.softmax((torch.cat(list(teacher)) - center) / teacher_temp, dim=-1)
    return -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean() / math.log(q.shape[-1])


@torch.no_grad()
def update_center_(center: Tensor, teacher: Sequence[Tensor], momentum: float = 0.9) -> None:
    """c <- m c + (1 - m) mean of the teacher outputs over every view and every rank's rows."""
    center.mul_(momentum).add_(global_row_mean(torch.cat(list(teacher))), alpha=1 - momentum)
