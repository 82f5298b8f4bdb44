"""NT-Xent and the kNN monitor against direct, hand-written computations; the DDP gather path."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from engine.methods.ssl_losses import ProjectionHead, knn_predict, nt_xent
from tests.conftest import run_two_gloo_ranks


def nt_xent_by_pairs(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss written as in the paper: one term per anchor, a loop over every other row."""
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    n = n2 // 2

    def sim(i: int, j: int) -> float:
        return float(z[i] @ z[j] / (z[i].norm() * z[j].norm()))

    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        denominator = sum(math.exp(sim(i, k) / temperature) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(i, positive) / temperature) / denominator)
    return total / n2


def test_nt_xent_matches_the_per_pair_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for temperature in (0.5, 0.1, 1.0):
        loss, logits, positive = nt_xent(z1, z2, temperature)
        assert float(loss) == pytest.approx(nt_xent_by_pairs(z1, z2, temperature), rel=1e-5)
        assert positive.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
        assert torch.isinf(logits.diagonal()).all() and torch.isfinite(logits.fill_diagonal_(0)).all()


def test_nt_xent_with_a_duplicated_image_counts_the_copy_as_a_negative() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    z1[2], z2[2] = z1[0], z2[0]  # image 2 is image 0 again (same views)
    loss = float(nt_xent(z1, z2, 0.5)[0])
    assert loss == pytest.approx(nt_xent_by_pairs(z1, z2, 0.5), rel=1e-5)
    # hand check of one anchor: row 0's denominator holds its twin (row 2) and the twin's other view
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    s = z @ z.T / 0.5
    assert s[0, 2] == pytest.approx(2.0) and s[0, 6] == pytest.approx(s[0, 4])


def test_nt_xent_two_identical_pairs_by_hand() -> None:
    # N = 2 orthogonal images whose two views coincide: similarities are 1 (positive) and 0 (two negatives)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = float(nt_xent(z1, z1.clone(), 0.5)[0])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2 * math.exp(0)))
    assert loss == pytest.approx(expected, rel=1e-6)


def _ddp_worker(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, queue: mp.Queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = len(z1) // 2
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss, _, positive = nt_xent(a, b, 0.5)
    loss.backward()
    local = float(nt_xent(a, b, 0.5, gather=False)[0])  # evaluation: no collective, this rank's rows only
    queue.put((rank, float(loss.detach()), a.grad.tolist(), b.grad.tolist(), positive.tolist(), local))
    dist.barrier()
    dist.destroy_process_group()


def test_nt_xent_under_ddp_gathers_negatives_with_gradients() -> None:
    """Two gloo ranks with half the batch each: mean loss and (DDP-averaged) gradients equal one
    process on the whole batch, which needs the negatives of both ranks and gradients through the gather."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full, _, _ = nt_xent(a, b, 0.5)
    full.backward()

    results = run_two_gloo_ranks(_ddp_worker, z1, z2)
    assert sum(r[1] for r in results) / 2 == pytest.approx(float(full.detach()), rel=1e-5)
    assert results[1][4] == [9, 10, 11, 3, 4, 5]  # rank 1's positives in the global key order
    assert results[0][5] == pytest.approx(float(nt_xent(z1[:3], z2[:3], 0.5)[0]), rel=1e-6)
    # each rank's gradient is the sum over both ranks' losses; the trainer weights each rank's loss by
    # its share of the batch (1/2) before summing gradients over ranks (DDP would average: the same)
    grad_a = torch.tensor([row for r in results for row in r[2]]) / 2
    grad_b = torch.tensor([row for r in results for row in r[3]]) / 2
    assert torch.allclose(grad_a, a.grad, atol=1e-6) and torch.allclose(grad_b, b.grad, atol=1e-6)


def test_knn_predict_weighted_vote_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    bank_labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.7, 0.72]])
    # k = 2: the two nearest neighbours of each query decide
    assert knn_predict(query, bank, bank_labels, 2, k=2).tolist() == [0, 1, 1]
    # k = 5, query 3: class 1 has three voters, but at T = 0.01 the nearest (cosine) wins alone
    sims = torch.nn.functional.normalize(bank, dim=1) @ torch.nn.functional.normalize(query[2], dim=0)
    nearest = int(sims.argmax())
    assert knn_predict(query[2:], bank, bank_labels, 2, k=5, temperature=0.01).item() == bank_labels[nearest]
    # and at T = 100 all five vote almost equally: the majority class (1) wins
    assert knn_predict(query[2:], bank, bank_labels, 2, k=5, temperature=100).item() == 1


def test_projection_head_shapes() -> None:
    assert ProjectionHead(512, 512, 128)(torch.zeros(3, 512)).shape == (3, 128)
    assert len(ProjectionHead(512, 0, 64)) == 1
