"""Data-parallel training under torchrun, kept out of the methods' way.

`init()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); outside torchrun
it returns a single-process `Dist` whose every operation is a no-op, so the trainer has
one code path. Under torchrun:

- the backend is gloo on CPU and nccl on CUDA (each rank on cuda:LOCAL_RANK);
- every rank walks the same shuffled order and takes a contiguous shard of each batch,
  so the GLOBAL batch is `data.batch_size` whatever the number of processes;
- gradients are summed with one flattened all-reduce per step, after each rank scaled its
  mean loss by (local rows / global rows): the result is exactly the gradient of the mean
  loss over the global batch, the same arithmetic as DistributedDataParallel. We do not wrap
  the method's networks in DDP so that methods keep calling their modules directly, and
  every trainable parameter (heads, projectors, auxiliary branches) is synchronised;
  the price is no overlap of communication with the backward pass;
- a small CPU control all-reduce per step agrees on stopping (SIGTERM reaches ranks at
  different moments) and on which parameters received gradients;
- evaluation shards each split over ranks and averages the metrics weighted by rows,
  so `Method.evaluate` must return per-sample means (loss, accuracies);
- `train.sync_bn` normalises with statistics of the global batch (torch's SyncBatchNorm
  on CUDA, `CpuSyncBatchNorm` below on CPU, which torch's version does not support).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class Dist:
    """This process's place in the job. world_size == 1 means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # process group for CPU-side agreement (gloo)
    _eval_shards: dict[int, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- batches
    def shard(self, images: Tensor, labels: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """This rank's contiguous rows of a global batch, and the loss weight n_local / n_global."""
        if not self.enabled:
            return images, labels, indices, 1.0
        n = len(labels)
        rows = torch.arange(n).tensor_split(self.world_size)[self.rank]
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        return images[lo:hi], labels[lo:hi], indices[lo:hi], (hi - lo) / n

    def needs_drop_last(self, n: int, batch_size: int) -> bool:
        """A trailing batch smaller than the world would leave a rank with no rows: drop it."""
        return self.enabled and 0 < n % batch_size < self.world_size

    # ---------------------------------------------------------------- per step
    def sync_step(self, params: list[nn.Parameter], signalled: bool) -> bool:
        """Sum gradients over ranks; return True on every rank once any rank was signalled to stop."""
        if not self.enabled:
            return signalled
        flags = torch.tensor([float(signalled)] + [float(p.grad is not None) for p in params])
        dist.all_reduce(flags, group=self.control)
        has_grad = [p for p, seen in zip(params, flags[1:].tolist(), strict=True) if seen > 0]
        for p in has_grad:
            if p.grad is None:  # unused on this rank, used on another: contribute zeros
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in has_grad]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return bool(flags[0] > 0)

    def sum_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """Sum tensors/numbers with the same keys over ranks (log windows, finiteness checks)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        device = next((v.device for v in values.values() if isinstance(v, Tensor)), torch.device("cpu"))
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(())
                               for k in keys])
        dist.all_reduce(stacked)
        return dict(zip(keys, stacked.unbind(), strict=True))

    def sum_tensor(self, tensor: Tensor) -> Tensor:
        """An element-wise sum over ranks (a copy; the input is left alone)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().to(torch.float64, copy=True)
        dist.all_reduce(out)
        return out

    # ---------------------------------------------------------------- models
    def sync_modules(self, modules: Iterable[nn.Module], buffers_only: bool = False) -> None:
        """Copy rank 0's parameters and buffers to every rank (start, resume, before eval)."""
        if not self.enabled:
            return
        for module in modules:
            tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
            for t in tensors:
                dist.broadcast(t.data, src=0)

    # ---------------------------------------------------------------- evaluation
    def eval_shard(self, split: Any) -> Any:
        """This rank's share of an evaluation split (cached), rows rank, rank + W, ..."""
        if not self.enabled:
            return split
        key = id(split)
        if key not in self._eval_shards:
            self._eval_shards[key] = (split, split.subset(torch.arange(self.rank, len(split), self.world_size)))
        return self._eval_shards[key][1]

    def mean_metrics(self, metrics: dict[str, float], rows: int) -> dict[str, float]:
        """Per-shard means -> means over the whole split, weighted by each shard's rows."""
        if not self.enabled:
            return metrics
        summed = self.sum_values({**{k: v * rows for k, v in metrics.items()}, "\0rows": float(rows)})
        total = float(summed.pop("\0rows"))
        return {k: float(v) / max(total, 1.0) for k, v in summed.items()}

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order (RNG states for an exact resume)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def close(self, wait_for_peers: bool = True) -> None:
        """Leave together: a rank that tears down while a peer still talks to it aborts that peer (gloo)."""
        if self.enabled and dist.is_initialized():
            if wait_for_peers:
                dist.barrier(group=self.control)
            dist.destroy_process_group()


def init(recipe: Any) -> Dist:
    """Join the torchrun job described by the environment; pins cuda ranks to cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = recipe.train.device.startswith("cuda")
    if on_cuda:
        recipe.train.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    backend = "nccl" if on_cuda else "gloo"
    store_path = os.environ.get("KDTUI_DIST_STORE")
    if store_path:  # one machine (tui/queue.py): a file store, so nothing listens on the network
        dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    else:  # several machines: torchrun's MASTER_ADDR/MASTER_PORT (env://)
        dist.init_process_group(backend)
    control = dist.new_group(backend="gloo") if on_cuda else None
    return Dist(rank=rank, world_size=world, local_rank=local_rank, control=control)


def prepare_modules(dist_: Dist, modules: dict[str, nn.Module], seed: int, sync_bn: bool, device: torch.device) -> None:
    """Sync BatchNorm if asked, rank 0's initial weights everywhere, then per-rank random streams."""
    if not dist_.enabled:
        return
    if sync_bn:
        for name, module in modules.items():
            converted = convert_sync_batchnorm(module, device)
            if converted is not module:
                raise ValueError(f"train.sync_bn: module {name!r} is itself a BatchNorm layer; wrap it first")
    dist_.sync_modules(modules.values())
    torch.manual_seed(seed * 1_000_003 + dist_.rank)  # dropout etc. differ per rank, reproducibly


def _buckets(grads: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    return list(groups.values())


# ---------------------------------------------------------------- synchronised BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of each rank's x is the sum of every rank's dL/dy."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch for gloo/CPU jobs (torch.nn.SyncBatchNorm needs a GPU).

    Two autograd all-reduces per layer: the mean, then the centred sum of squares, so the
    statistics and their gradients equal those of one BatchNorm over all ranks' rows.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()  # statistics in fp32 whatever the autocast dtype
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        out = out.to(input.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / max(float(n) - 1, 1.0), momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer in place: torch's SyncBatchNorm on CUDA, CpuSyncBatchNorm on CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm | nn.SyncBatchNorm):
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


class NullMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    tb = None

    def log(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
