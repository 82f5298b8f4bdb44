"""Learning-rate schedules against their formulas, evaluated by the real LambdaLR the trainer steps."""

from __future__ import annotations

import math

import pytest
import torch

from engine.optim import build_scheduler
from engine.recipe import ScheduleSection


def lrs(cfg: ScheduleSection, base_lr: float, epochs: int, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_scheduler(cfg, optimizer, base_lr, epochs, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_fraction_is_fixmatchs_decay_per_step() -> None:
    """FixMatch: lr0 cos(7 pi k / 16 K) for step k of K (Sohn et al. 2020)."""
    cfg = ScheduleSection(name="cosine_fraction", per="step")
    got = lrs(cfg, 0.03, epochs=4, steps_per_epoch=8)
    total = 32
    assert got == pytest.approx([0.03 * math.cos(7 * math.pi * k / (16 * total)) for k in range(total)], abs=1e-12)
    assert got[-1] > 0.03 * math.cos(7 * math.pi / 16) > 0  # never reaches zero: 7/16 of a half period


def test_cosine_fraction_period_and_fraction_keys() -> None:
    cfg = ScheduleSection(name="cosine_fraction", per="epoch", fraction=0.5, period=2)
    got = lrs(cfg, 1.0, epochs=3, steps_per_epoch=2)
    assert got == pytest.approx([1, 1, math.cos(math.pi / 4), math.cos(math.pi / 4), 0, 0], abs=1e-12)
