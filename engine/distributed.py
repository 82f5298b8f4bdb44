"""Data-parallel training under torchrun, kept out of the methods' way.

`init()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); outside torchrun
it returns a single-process `Dist` whose every operation is a no-op, so the trainer has
one code path. Under torchrun:

- the backend is gloo on CPU and nccl on CUDA (each rank on cuda:LOCAL_RANK);
- every rank walks the same shuffled order and takes a contiguous shard of each batch,
  so the GLOBAL batch is `data.batch_size` whatever the number of processes;
- gradients go through torch's DistributedDataParallel (`DataParallelStep`), so they are
  bucketed and all-reduced while backward still runs. DDP wraps `StepModule`, a container of
  every saved module of the method that has trainable parameters, whose forward is the
  method's own `train_step`: methods keep calling their modules directly (student, heads,
  projectors, a teacher, EMA targets) and DDP's forward still prepares the reducer for every
  parameter the step uses. Frozen parameters (requires_grad False) are not DDP's; trainable
  ones outside the current phase's optimizer are ignored for that phase (each phase gets its
  own DDP: pre-phases train other parameters);
- the arithmetic: each rank scales its mean loss by (local rows / global rows) and a comm hook
  SUMS the buckets (DDP's default hook averages), so the result is exactly the gradient of the
  mean loss over the global batch for any world size and shard sizes (averaging instead would
  need the loss scaled by world_size, one more rounding when that is not a power of two);
- `find_unused_parameters`: a phase's first step runs with it (safe: a parameter that no rank
  uses keeps grad None, as in one process; one unused on some ranks only gets their zeros), and
  reads the step's autograd graph; if every rank reached every covered parameter, the phase
  continues on a DDP without it (no graph traversal per step). A method whose set of used
  parameters changes later in a phase is caught on the rank that missed a gradient (an error
  that names the phase) instead of a silent wrong step;
- `broadcast_buffers` is off (the trainer copies rank 0's buffers after each epoch; DDP's
  per-forward broadcast would cost a collective per step), and so is DDP's initial sync
  (`prepare_modules` already broadcast rank 0's weights);
- stopping (SIGTERM reaches ranks at different moments) is agreed without a blocking host
  round trip per step: each step launches an asynchronous all-reduce of this rank's flag and
  reads the one launched a step earlier, long complete by then (one gradient all-reduce has
  passed in between); every rank reads the same result at the same step, so all stop on the
  same step, and the end of each epoch agrees once more, blocking;
- evaluation shards each split over ranks and averages the metrics weighted by rows,
  so `Method.evaluate` must return per-sample means (loss, accuracies);
- `train.sync_bn` normalises with statistics of the global batch (torch's SyncBatchNorm
  on CUDA, `CpuSyncBatchNorm` below on CPU, which torch's version does not support).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    """This process's place in the job. world_size == 1 means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # process group for CPU-side agreement (gloo)
    _eval_shards: dict[int, Any] = field(default_factory=dict)
    _stop_pending: tuple[Any, Tensor] | None = None  # (work, flag) of the last poll_stop

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

    # ---------------------------------------------------------------- stopping
    def poll_stop(self, signalled: bool) -> bool:
        """Call once per step on every rank: True (everywhere, at the same step) once a rank that
        was signalled had launched its flag. Never blocks on a round trip: it launches this step's
        asynchronous all-reduce of the flag and returns the result of the previous step's."""
        if not self.enabled:
            return signalled
        previous = self._collect_stop()
        flag = torch.tensor([float(signalled)])
        self._stop_pending = (dist.all_reduce(flag, group=self.control, async_op=True), flag)
        return previous

    def agree_stop(self, signalled: bool) -> bool:
        """A blocking agreement (end of an epoch): the pending flag, then this moment's flags."""
        if not self.enabled:
            return signalled
        previous = self._collect_stop()
        flag = torch.tensor([float(signalled)])
        dist.all_reduce(flag, group=self.control)
        return previous or bool(flag[0] > 0)

    def _collect_stop(self) -> bool:
        if self._stop_pending is None:
            return False
        work, flag = self._stop_pending
        self._stop_pending = None
        work.wait()
        return bool(flag[0] > 0)

    def all_true(self, value: bool) -> bool:
        """True where `value` holds on every rank (a blocking control all-reduce)."""
        if not self.enabled:
            return value
        flag = torch.tensor([float(not value)])
        dist.all_reduce(flag, group=self.control)
        return bool(flag[0] == 0)

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


# ---------------------------------------------------------------- the train step under DDP


class StepModule(nn.Module):
    """What DDP wraps: the method's saved networks that train, as submodules (so DDP finds their
    parameters), and a forward that is the method's own train step."""

    def __init__(self, method: Any, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(modules)
        self.method = method  # not an nn.Module: a plain attribute

    def forward(self, images: Tensor, labels: Tensor, generator: torch.Generator,
                indices: Tensor | None) -> dict[str, Tensor]:
        return self.method.train_step(images, labels, generator, indices=indices)


class SingleProcessStep:
    """One process: the method's train step itself, nothing around it."""

    ddp = None

    def __init__(self, method: Any) -> None:
        self.method = method

    def __call__(self, phase: Any, params: list[nn.Parameter], images: Tensor, labels: Tensor,
                 generator: torch.Generator, indices: Tensor | None) -> dict[str, Tensor]:
        return self.method.train_step(images, labels, generator, indices=indices)

    def after_backward(self) -> None:
        pass


class DataParallelStep(SingleProcessStep):
    """The method's train step through DistributedDataParallel, one DDP per phase (see the module
    docstring: which parameters, find_unused_parameters, the summing comm hook)."""

    def __init__(self, dist_: Dist, method: Any) -> None:
        super().__init__(method)
        self.dist = dist_
        self.phase: Any = None
        self.ddp: DistributedDataParallel | None = None
        self.find_unused = True
        self.covered: list[nn.Parameter] = []
        self._probing = False
        self._reached: set[int] = set()

    def __call__(self, phase: Any, params: list[nn.Parameter], images: Tensor, labels: Tensor,
                 generator: torch.Generator, indices: Tensor | None) -> dict[str, Tensor]:
        if phase is not self.phase:  # a new phase (or the first step of this process)
            self.phase, self._probing = phase, True
            self._build(params, find_unused=True)
        assert self.ddp is not None
        out = self.ddp(images, labels, generator, indices)
        if self._probing:
            self._reached = _reached_parameters(out["loss"])
        return out

    def after_backward(self) -> None:
        """After the phase's first backward: drop find_unused_parameters if no rank needs it.
        Later: a parameter without a gradient means the method's graph changed; say so."""
        if self._probing:
            self._probing = False
            if self.dist.all_true(all(id(p) in self._reached for p in self.covered)):
                self._build(self.covered, find_unused=False)
            return
        if not self.find_unused and any(p.grad is None for p in self.covered):
            name = getattr(self.phase, "name", self.phase)
            raise RuntimeError(f"phase {name!r}: this step left trainable parameters without a gradient that every "
                               "rank's first step of the phase used; DDP (find_unused_parameters off) cannot "
                               "reduce such a step: the method's graph must not change within a phase")

    def _build(self, params: list[nn.Parameter], find_unused: bool) -> None:
        if self.ddp is not None:
            self.ddp._remove_autograd_hooks()  # the old reducer must not see this phase's gradients
            self.ddp = None
        wanted = {id(p) for p in params}
        modules = {name: m for name, m in self.method.modules_to_save().items()
                   if any(p.requires_grad for p in m.parameters())}
        container = StepModule(self.method, modules)
        owned = {id(p) for p in container.parameters()}
        strays = [p for p in params if id(p) not in owned]
        if strays:
            raise ValueError(f"{len(strays)} optimized parameter tensors belong to no module of modules_to_save(): "
                             "DDP cannot synchronise them (nor can a checkpoint save them)")
        ignored = []
        for name, p in container.named_parameters():
            if hasattr(p, "_ddp_ignored"):  # left by a previous phase's DDP
                del p._ddp_ignored
            if p.requires_grad and id(p) not in wanted:
                ignored.append(name)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(container, ignored)
        self.covered = [p for p in container.parameters() if p.requires_grad and id(p) in wanted]
        self.find_unused = find_unused
        self.ddp = DistributedDataParallel(container, find_unused_parameters=find_unused,
                                           gradient_as_bucket_view=True, **_DDP_QUIET)
        self.ddp.register_comm_hook(None, _sum_hook)


_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
_DDP_QUIET: dict[str, bool] = {
    # no buffer broadcast per forward (the trainer syncs rank 0's after each epoch), no initial sync
    ("forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"): False,
    **({"init_sync": False} if "init_sync" in _DDP_ARGS else {}),
}


def step_runner(dist_: Dist, method: Any) -> SingleProcessStep:
    """How the trainer runs a train step: plainly in one process, through DDP under torchrun."""
    return DataParallelStep(dist_, method) if dist_.enabled else SingleProcessStep(method)


def _sum_hook(group, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations; ours are strings
    """DDP comm hook: the bucket's sum over ranks (each rank already weighted its loss)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _reached_parameters(loss: Tensor) -> set[int]:
    """ids of the leaf tensors the loss's autograd graph reaches (a phase's first step only)."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that gets .grad
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


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
