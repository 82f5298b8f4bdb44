"""Optimizers and learning-rate schedules.

Every schedule is one LambdaLR stepped once per iteration. `per = "epoch"` makes the
factor piecewise constant within an epoch, `per = "step"` makes it continuous; so a
per-iteration cosine can never be stepped per epoch by mistake. A param group with
`fixed_lr: True` keeps its lr outside the schedule (SimSiam's predictor).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.recipe import OptimSection, ScheduleSection


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017, arXiv:1708.03888), as solo-learn's
    solo/utils/lars.py (from Lightning Bolts) computes it, with its exclude_bias_n_norm always on:

        trust = eta ||p|| / (||g|| + wd ||p|| + eps)   (clip: min(trust / lr, 1), so lr_eff <= lr)
        d = trust (g + wd p)                           for weights (ndim > 1) with ||p||, ||g|| > 0
        d = g                                          for biases and norm parameters (ndim <= 1):
                                                       no adaptation and no weight decay
        buf = momentum buf + d (buf = d at the first step); p -= lr (d + momentum buf if nesterov else buf)

    The trust ratio stays on the device (no host sync per parameter). solo-learn's CIFAR recipes use
    eta 0.02, clipping and the exclusion (scripts/pretrain/cifar/{byol,barlow,vicreg,dino}.yaml)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, eta: float = 0.02, clip: bool = True, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov, "eta": eta, "clip": clip, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = p_norm / (g_norm + p_norm * wd + group["eps"]) * group["eta"]
                    if group["clip"]:
                        trust = torch.clamp(trust / lr, max=1.0)
                    adapt = (p_norm > 0) & (g_norm > 0)
                    d = torch.where(adapt, d.add(p, alpha=wd) * trust, d)
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    buf = state["momentum_buffer"]
                    d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(d, alpha=-lr)
        return loss


def build_optimizer(cfg: OptimSection, params: Iterable[Any]) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "lars":
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    nesterov=cfg.nesterov and cfg.momentum > 0, eta=cfg.lars_eta, clip=cfg.lars_clip)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleSection, base_lr: float, epochs: int) -> Callable[[float], float]:
    """Multiplier of the base lr as a function of (possibly fractional) epoch."""

    def cosine(t: float, period: float, floor: float) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / period))

    if cfg.name == "constant":
        shape = lambda t: 1.0
    elif cfg.name == "multistep":
        milestones = sorted(cfg.milestones)
        shape = lambda t: cfg.gamma ** bisect.bisect_right(milestones, t)
    elif cfg.name in ("cosine", "cosine_floor"):
        period = cfg.period or epochs
        shape = lambda t: cosine(min(t, period), period, cfg.min_lr / base_lr)
    elif cfg.name == "cosine_fraction":  # FixMatch's lr0 cos(7 pi k / 16 K): a part of a cosine, no floor
        period = cfg.period or epochs
        shape = lambda t: math.cos(cfg.fraction * math.pi * min(t, period) / period)
    else:  # stages: consecutive blocks of epochs, each with its own absolute lr and shape
        starts = [0]
        for stage in cfg.stages:
            starts.append(starts[-1] + stage.epochs)

        def shape(t: float) -> float:
            index = min(bisect.bisect_right(starts, t) - 1, len(cfg.stages) - 1)
            stage, local = cfg.stages[index], t - starts[index]
            scale = stage.lr / base_lr
            if stage.schedule == "cosine":
                scale *= cosine(local, stage.period or stage.epochs, cfg.min_lr / stage.lr)
            return scale

    def factor(t: float) -> float:
        warm = min(1.0, (t + (0 if cfg.per == "step" else 1)) / cfg.warmup_epochs) if cfg.warmup_epochs else 1.0
        return warm * shape(t)

    return factor


def build_scheduler(cfg: ScheduleSection, optimizer: torch.optim.Optimizer, base_lr: float,
                    epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    factor = lr_factor(cfg, base_lr, epochs)
    steps_per_epoch = max(steps_per_epoch, 1)
    if cfg.per == "epoch":
        scheduled = lambda step: factor(step // steps_per_epoch)
    else:
        scheduled = lambda step: factor(step / steps_per_epoch)
    fixed = lambda step: 1.0
    lambdas = [fixed if group.get("fixed_lr") else scheduled for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
