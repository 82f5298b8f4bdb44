"""Seeded, stratified subsets: `scale` (keep a fraction per class) and the val hold-out."""

from __future__ import annotations

import torch
from torch import Tensor


def _ranks_within_class(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random rank 0..n_c-1 for every row within its class: (rows in random order, ranks)."""
    perm = torch.randperm(labels.numel(), generator=generator)
    grouped = perm[torch.argsort(labels[perm], stable=True)]       # by class, random within class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.arange(labels.numel()) - starts[labels[grouped]]
    return grouped, ranks


def stratified_fraction(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted row indices keeping round(fraction * n_c) rows of each class (at least 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"scale must be in (0, 1], got {fraction}")
    if fraction == 1:
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    grouped, ranks = _ranks_within_class(labels, g)
    keep = (torch.bincount(labels).double() * fraction).round().long().clamp_min(1)
    return grouped[ranks < keep[labels[grouped]]].sort().values


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train_rows, val_rows), sorted and disjoint: round(fraction * n_c) of each class goes to
    val (at least 1), but every class keeps at least one training row."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    grouped, ranks = _ranks_within_class(labels, g)
    counts = torch.bincount(labels)
    n_val = torch.minimum((counts.double() * fraction).round().long().clamp_min(1), counts - 1)
    is_val = ranks < n_val[labels[grouped]]
    return grouped[~is_val].sort().values, grouped[is_val].sort().values
