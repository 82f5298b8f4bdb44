"""Optimizers and learning-rate schedules.

Every schedule is one LambdaLR stepped once per iteration. `per = "epoch"` makes the
factor piecewise constant within an epoch, `per = "step"` makes it continuous; so a
per-iteration cosine can never be stepped per epoch by mistake.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from engine.recipe import OptimSection, ScheduleSection


def build_optimizer(cfg: OptimSection, params: Iterable[Any]) -> torch.optim.Optimizer:
    params = list(params)
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
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step // steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / steps_per_epoch))
