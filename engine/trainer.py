"""The training loop, the same for every method.

Reads `runs/<id>/recipe.toml`, trains, and keeps the run directory current:
metric events, run.json and atomic checkpoints. Resume is exact: each epoch's
shuffle order and augmentation come from generators seeded by (seed, epoch), and
a checkpoint stores the global and augmentation RNG states, so an interrupted run
that resumes ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from engine import distributed
from engine.checkpoint import DiskFullError, load_checkpoint, remove_stale_temps, save_checkpoint
from engine.data import build_data
from engine.heap import keep_freed_heap
from engine.methods.base import Method, Phase, topk_correct
from engine.methods.registry import method_class
from engine.metrics import MetricsLog
from engine.optim import build_optimizer, build_scheduler
from engine.recipe import Recipe, ScheduleSection, load_recipe
from engine.rundir import RunDir

EXIT_FINISHED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken in total
    batch_in_epoch: int = 0  # steps into an unfinished epoch (after Ctrl-C / SIGTERM)
    best_value: float | None = None
    best: dict[str, float] = field(default_factory=dict)


@dataclass
class PhaseRun:
    """A phase as the trainer runs it: epochs [start, end) of the run, with its own optimizer.
    Every run ends with the main phase "train" (train.epochs, the recipe's optimizer and schedule);
    a method's pre_phases() come first, each at a constant learning rate and without evaluation."""

    name: str
    start: int
    end: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    evaluate: bool


def epoch_generators(seed: int, epoch: int, rank: int = 0) -> tuple[torch.Generator, torch.Generator]:
    """Independent (shuffle order, augmentation) generators for one epoch. Under torchrun every
    rank shares the order (one global batch) and draws its own augmentation."""
    order = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2)
    augment = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + 1 + rank * 2**40)
    return order, augment


def setup_torch(recipe: Recipe) -> torch.device:
    device = torch.device(recipe.train.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    torch.manual_seed(recipe.train.seed)
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        keep_freed_heap()  # batches are built in fresh host buffers: reuse them, do not page-fault
    return device


def apply_speed_switches(method: Method, recipe: Recipe) -> None:
    """`train.channels_last`: the method's networks, and every batch the training model sees, in
    NHWC (what tensor cores and oneDNN convolutions prefer). `train.compile`: torch.compile the
    training model in place (`Module.compile`), so there is no wrapper and state-dict keys stay
    those of the plain model: checkpoints load into `build_model` with no `_orig_mod.` prefix."""
    if recipe.train.channels_last_on(method.device.type):
        for module in method.modules_to_save().values():
            module.to(memory_format=torch.channels_last)
        method.model.register_forward_pre_hook(_channels_last_inputs)
    if recipe.train.compile:
        method.model.compile()


def _channels_last_inputs(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    del module
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


class Trainer:
    def __init__(self, run: RunDir, resume: bool = False) -> None:
        self.run = run
        self.recipe = load_recipe(run.recipe_path)
        self.dist = distributed.init(self.recipe)  # torchrun: join the job; otherwise one process
        self.device = setup_torch(self.recipe)
        r = self.recipe
        self.data = build_data(
            r.data.dataset, r.data.root, scale=r.data.scale, val_fraction=r.data.val_fraction, seed=r.train.seed,
            download=r.data.download, image_size=r.data.image_size, num_workers=r.data.num_workers,
            embedded_per_class=r.data.embedded_per_class,
        )
        self.method: Method = method_class(r.run.method)(r, self.data, self.device)
        distributed.prepare_modules(self.dist, self.method.modules_to_save(), r.train.seed, r.train.sync_bn,
                                    self.device)
        apply_speed_switches(self.method, r)
        self.run_step = distributed.step_runner(self.dist, self.method)  # torchrun: through DDP
        self.drop_last = self.method.drop_last or self.dist.needs_drop_last(len(self.data.train), r.data.batch_size)
        batches = self.data.train.num_batches(r.data.batch_size, self.drop_last)
        self.steps_per_epoch = min(batches, r.train.max_steps_per_epoch or batches)
        self.phases = self._plan_phases(self.method.pre_phases())
        self.epochs = self.phases[-1].end  # pre-phases + train.epochs
        self.phase = self.phases[0]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.train.precision == "fp16")
        self.progress = Progress()
        self.aug_state: torch.Tensor | None = None
        if resume:
            self._restore(load_checkpoint(run.checkpoints / "last.pt"))
        self.phase = self._phase_at(self.progress.epoch)
        if self.dist.is_main:  # a process killed mid-write leaves a partial temp checkpoint behind
            remove_stale_temps(run.checkpoints)
        self.metrics = (MetricsLog(run, resume_step=self.progress.step if resume else None) if self.dist.is_main
                        else distributed.NullMetrics())  # only rank 0 writes to the run directory
        self.stop_requested = self.signalled = False

    def _plan_phases(self, pre_phases: list[Phase]) -> list[PhaseRun]:
        r, plan, start = self.recipe, [], 0
        for phase in pre_phases:
            cfg = r.optim.model_copy(update={"lr": phase.lr or r.optim.lr})
            optimizer = build_optimizer(cfg, phase.parameters)
            scheduler = build_scheduler(ScheduleSection(name="constant"), optimizer, cfg.lr, phase.epochs,
                                        self.steps_per_epoch)
            plan.append(PhaseRun(phase.name, start, start + phase.epochs, optimizer, scheduler, evaluate=False))
            start += phase.epochs
        optimizer = build_optimizer(r.optim, self.method.parameter_groups())
        scheduler = build_scheduler(r.schedule, optimizer, r.optim.lr, r.train.epochs, self.steps_per_epoch)
        plan.append(PhaseRun("train", start, start + r.train.epochs, optimizer, scheduler, evaluate=r.train.evaluate))
        return plan

    def _phase_at(self, epoch: int) -> PhaseRun:
        return next((p for p in self.phases if epoch < p.end), self.phases[-1])

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.phase.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.phase.scheduler

    # ---------------------------------------------------------------- loop
    def fit(self) -> int:
        r, info = self.recipe, self.run.read_info()
        self._info(
            status="running", pid=os.getpid(), host=socket.gethostname(), started=info.get("started") or time.time(),
            ended=None, error=None, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            method=r.run.method, arch=r.model.arch, dataset=r.data.dataset, device=info.get("device") or r.train.device,
            train_images=len(self.data.train), processes=self.dist.world_size,
            batches_per_epoch=self.data.train.num_batches(r.data.batch_size, self.drop_last),
        )
        self._install_signal_handlers()
        self._log_graph_once()
        if self.dist.is_main:
            print(f"kdtui: {r.run.method} {r.model.arch} on {r.data.dataset} ({len(self.data.train)} train images), "
                  f"{self.epochs} epochs x {self.steps_per_epoch} steps, device {self.device}", flush=True)
        crashed = False
        try:
            for epoch in range(self.progress.epoch, self.epochs):
                self.phase = self._phase_at(epoch)
                self._train_epoch(epoch)
                self.dist.sync_modules(self.method.modules_to_save().values(), buffers_only=True)  # rank 0's BN stats
                if self.stop_requested:
                    return self._finish("interrupted", save=True)
                due = (epoch + 1) % r.train.eval_every == 0 or epoch + 1 == self.epochs
                evals = self._evaluate(epoch + 1) if due and self.phase.evaluate else {}
                self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
                self._end_of_epoch_checkpoints(evals)
                self._info(epoch=self.progress.epoch, step=self.progress.step, best=self.progress.best,
                           last=_flatten_evals(evals) or self.run.read_info().get("last", {}))
            return self._finish("finished")
        except NonFiniteLoss as err:
            return self._finish("failed", error=str(err))
        except DiskFullError as err:
            return self._finish("failed", error=f"disk full: {err.strerror}")
        except Exception as err:
            crashed = True  # this rank alone: its peers are elsewhere, so no parting barrier
            traceback.print_exc()
            return self._finish("failed", error=f"{type(err).__name__}: {err}"[:500])
        finally:
            self.metrics.close()
            self.dist.close(wait_for_peers=not crashed)

    def _info(self, **fields: Any) -> None:
        """Update run.json; under torchrun only rank 0 writes."""
        if self.dist.is_main:
            self.run.update_info(**fields)

    def _train_epoch(self, epoch: int) -> None:
        r, method = self.recipe, self.method
        order_gen, aug_gen = epoch_generators(r.train.seed, epoch, self.dist.rank)
        if self.aug_state is not None:  # resuming mid-epoch
            aug_gen.set_state(self.aug_state)
            self.aug_state = None
        self.aug_gen = aug_gen
        method.phase, method.epoch = self.phase.name, epoch + 1 - self.phase.start
        method.train_mode()
        phase = {"phase": self.phase.name} if len(self.phases) > 1 else {}  # events say which phase
        batches = self.data.train.batches(r.data.batch_size, shuffle=True, drop_last=self.drop_last,
                                          generator=order_gen, device=self.device)
        batches = islice(batches, self.progress.batch_in_epoch, self.steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        window = {"images": 0, "start": time.perf_counter(), "losses": []}
        epoch_sums: dict[str, torch.Tensor] = {}
        epoch_images = 0
        for images, labels, indices in batches:
            images, labels, indices, weight = self.dist.shard(images, labels, indices)  # this rank's rows
            out = self._step(images, labels, indices, aug_gen, weight)
            self.progress.step += 1
            self.progress.batch_in_epoch += 1
            window["images"] += len(labels)
            epoch_images += len(labels)
            window["losses"].append(out["loss"].detach())
            for key, value in _step_scalars(out).items():
                sums[key] = sums.get(key, 0) + value * len(labels)
                epoch_sums[key] = epoch_sums.get(key, 0) + value * len(labels)
            if self.progress.step % r.train.log_every == 0 or self.progress.batch_in_epoch == self.steps_per_epoch:
                if self.dist.enabled:  # global batch: sum the window over ranks (NaN anywhere shows everywhere)
                    window["losses"] = list(self.dist.sum_tensor(torch.stack(window["losses"])).unbind())
                    sums = self.dist.sum_values({**sums, "\0images": window["images"]})
                    window["images"] = int(sums.pop("\0images"))
                self._check_finite(window["losses"], epoch)
                elapsed = max(time.perf_counter() - window["start"], 1e-9)
                self.metrics.log("train", epoch + 1, self.progress.step, kind="step", **phase,
                                 lr=self.optimizer.param_groups[0]["lr"], images_per_s=window["images"] / elapsed,
                                 **{k: float(v) / window["images"] for k, v in sums.items()})
                sums, window = {}, {"images": 0, "start": time.perf_counter(), "losses": []}
            if self.stop_requested:
                break
        self.stop_requested |= self.dist.agree_stop(self.signalled)  # torchrun: a late signal stops all here
        self._check_finite(window["losses"], epoch)
        if self.dist.enabled:
            epoch_sums = self.dist.sum_values({**epoch_sums, "\0images": epoch_images})
            epoch_images = int(epoch_sums.pop("\0images"))
        if epoch_images and not self.stop_requested:
            self.metrics.log("train", epoch + 1, self.progress.step, kind="epoch", **phase,
                             lr=self.optimizer.param_groups[0]["lr"],
                             **{k: float(v) / epoch_images for k, v in epoch_sums.items()})

    def _step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, generator: torch.Generator,
              weight: float = 1.0) -> dict[str, torch.Tensor]:
        r = self.recipe
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with self._autocast():
            out = self.run_step(self.phase, params, images, labels, generator, indices)
        self.optimizer.zero_grad(set_to_none=True)
        # torchrun: DDP sums the weighted gradients over ranks while backward runs
        self.scaler.scale(out["loss"] if weight == 1.0 else out["loss"] * weight).backward()
        self.run_step.after_backward()
        self.stop_requested |= self.dist.poll_stop(self.signalled)  # torchrun: all ranks, the same step
        if r.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, r.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_optimizer_step(self.progress.step + 1)
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.recipe.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check_finite(self, losses: list[torch.Tensor], epoch: int) -> None:
        """One sync per log window; names the first bad step exactly."""
        if not losses:
            return
        finite = torch.isfinite(torch.stack(losses).float())
        if bool(finite.all()):
            return
        first_bad = int((~finite).nonzero()[0])
        step = self.progress.step - len(losses) + first_bad + 1
        value = float(losses[first_bad])
        raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step}; lower optim.lr or check the data")

    # ---------------------------------------------------------------- evaluation & checkpoints
    def _evaluate(self, epoch: int) -> dict[str, dict[str, float]]:
        evals: dict[str, dict[str, float]] = {}
        with self._autocast():
            for name in ("val", "test"):
                split = getattr(self.data, name)
                if split is None:
                    continue
                shard = self.dist.eval_shard(split)  # torchrun: each rank evaluates its share
                evals[name] = self.dist.mean_metrics(self.method.evaluate(shard, self.recipe.data.eval_batch_size),
                                                     len(shard))
                self.metrics.log(name, epoch, self.progress.step, **evals[name])
        self.metrics.flush()
        shown = "  ".join(f"{s}.{k}={v:.4f}" for s, m in evals.items() for k, v in m.items() if k in ("loss", "top1"))
        if self.dist.is_main:
            print(f"epoch {epoch}/{self.epochs} step {self.progress.step}  {shown}", flush=True)
        return evals

    def _end_of_epoch_checkpoints(self, evals: dict[str, dict[str, float]]) -> None:
        """Write last.pt once; epoch_NNNN.pt and best.pt are hard links to that same file."""
        cfg, epoch = self.recipe.checkpoint, self.progress.epoch
        value = _metric(evals, cfg.best_metric)
        improved = value is not None and (
            self.progress.best_value is None
            or (value > self.progress.best_value if cfg.best_mode == "max" else value < self.progress.best_value))
        if improved:
            self.progress.best_value = value
            self.progress.best = {**_flatten_evals(evals), "epoch": epoch, "metric": cfg.best_metric}
        last = self.run.checkpoints / "last.pt"
        state = self._state(evals)  # on every rank: gathers per-rank RNG states under torchrun
        if not self.dist.is_main:
            return
        save_checkpoint(state, last)
        if cfg.every and epoch % cfg.every == 0:
            _link_or_copy(last, self.run.checkpoints / f"epoch_{epoch:04d}.pt")
            self._prune_epoch_checkpoints()
        if improved:
            _link_or_copy(last, self.run.checkpoints / "best.pt")

    def _prune_epoch_checkpoints(self) -> None:
        keep = self.recipe.checkpoint.keep
        if keep:
            for old in sorted(self.run.checkpoints.glob("epoch_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)

    def _state(self, evals: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        r, method = self.recipe, self.method
        return {
            "model": method.eval_model().state_dict(),
            "modules": {name: module.state_dict() for name, module in method.modules_to_save().items()},
            "extra": method.extra_state(),
            "arch": r.model.arch,
            "num_classes": r.model.num_classes or self.data.num_classes,
            "dataset": self.data.name,
            "class_names": list(self.data.class_names),
            "method": r.run.method,
            "recipe": r.to_toml(),
            "optimizer": self.phases[-1].optimizer.state_dict(),  # the main phase's
            "scheduler": self.phases[-1].scheduler.state_dict(),
            "pre_phases": {p.name: {"optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict()}
                           for p in self.phases[:-1]},
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "augment": self.aug_gen.get_state() if self.progress.batch_in_epoch else None,
                **({"ranks": self.dist.gather({"torch": torch.get_rng_state(),
                                               "augment": self.aug_gen.get_state() if self.progress.batch_in_epoch
                                               else None})} if self.dist.enabled else {}),
            },
            "metrics": evals or {},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        for name, module in self.method.modules_to_save().items():
            module.load_state_dict(state["modules"][name])
        self.method.load_extra_state(state.get("extra", {}))
        self.phases[-1].optimizer.load_state_dict(state["optimizer"])
        self.phases[-1].scheduler.load_state_dict(state["scheduler"])
        for phase in self.phases[:-1]:
            saved = state.get("pre_phases", {}).get(phase.name)
            if saved is not None:
                phase.optimizer.load_state_dict(saved["optimizer"])
                phase.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        rng = state["rng"]
        if len(rng.get("ranks") or []) == self.dist.world_size:  # torchrun: each rank its own streams
            rng = {**rng, **rng["ranks"][self.dist.rank]}
        elif self.dist.rank:  # a different number of processes than saved: keep this rank's fresh seed
            rng = {**rng, "torch": torch.get_rng_state(), "augment": None}
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.aug_state = rng["augment"]

    # ---------------------------------------------------------------- lifecycle
    def _finish(self, status: str, error: str | None = None, save: bool = False) -> int:
        if save:
            try:
                state = self._state()  # every rank takes part (RNG gather); rank 0 writes
                if self.dist.is_main:
                    save_checkpoint(state, self.run.checkpoints / "last.pt")
            except DiskFullError as err:
                status, error = "failed", f"disk full: {err.strerror}"
        self._info(status=status, error=error, ended=time.time(), epoch=self.progress.epoch,
                   step=self.progress.step, best=self.progress.best)
        if self.dist.is_main:
            print(f"kdtui: run {status}" + (f": {error}" if error else ""), flush=True,
                  file=sys.stderr if error else sys.stdout)
        return {"finished": EXIT_FINISHED, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: object) -> None:
            del frame
            print(f"kdtui: received signal {signum}; stopping after this step", flush=True)
            self.signalled = True  # stop_requested after this step (torchrun: the next, on every rank at once)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _log_graph_once(self) -> None:
        if self.progress.step or not self.dist.is_main:
            return
        model = self.method.eval_model()
        if getattr(model, "_compiled_call_impl", None) is not None:  # jit.trace cannot trace a compiled module
            print("kdtui: TensorBoard graph skipped (train.compile)", flush=True)
            return
        size = self.data.image_size
        try:
            was_training = model.training
            model.eval()
            with warnings.catch_warnings():  # jit.trace deprecation noise would fill train.log
                warnings.simplefilter("ignore")
                self.metrics.tb.add_graph(model, torch.zeros(1, 3, size, size, device=self.device))
            model.train(was_training)
        except Exception as err:
            print(f"kdtui: TensorBoard graph skipped ({type(err).__name__})", flush=True)


def _step_scalars(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample means to accumulate: the loss, train top-1/top-5, and any extra scalars."""
    scalars = {key: value.detach().float() for key, value in out.items()
               if key not in ("logits", "labels") and value.dim() == 0}
    if "logits" in out and "labels" in out:
        correct = topk_correct(out["logits"].float(), out["labels"])
        scalars["top1"], scalars["top5"] = correct / len(out["labels"])
    return scalars


def _flatten_evals(evals: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}.{key}": value for split, metrics in evals.items() for key, value in metrics.items()}


def _metric(evals: dict[str, dict[str, float]], dotted: str) -> float | None:
    split, _, key = dotted.partition(".")
    if split not in evals and split == "val":
        split = "test"  # no held-out split configured: fall back to test
    return evals.get(split, {}).get(key)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the just-written checkpoint under another name (no second write), atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links: copy, and leave no partial copy behind
        import errno
        import shutil

        try:
            shutil.copyfile(source, tmp)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise DiskFullError(err.errno, f"disk full while writing {target}: {err.strerror}") from err
            raise
    os.replace(tmp, target)


def train(run_path: str | Path, resume: bool = False) -> int:
    return Trainer(RunDir(Path(run_path)), resume=resume).fit()
