"""The SSL zoo's losses, schedules, queue and LARS against hand computations (float64, 1e-6 or exact);
the torchrun gathers of Barlow Twins / VICReg (with gradients) and MoCo / DINO (without) on two gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.methods.ssl_zoo_losses import (
    barlow_twins_loss,
    batch_standardize,
    byol_loss,
    cosine_momentum,
    cross_correlation,
    dino_loss,
    ema_parameters_,
    enqueue_,
    gather_no_grad,
    global_row_mean,
    moco_logits,
    moco_loss,
    negative_cosine,
    normalized_regression,
    normalized_std,
    off_diagonal,
    simsiam_loss,
    teacher_temperature,
    update_center_,
    vicreg_terms,
)
from engine.optim import LARS, build_optimizer, build_scheduler
from engine.recipe import OptimSection, ScheduleSection
from tests.conftest import run_two_gloo_ranks

D = torch.float64


def t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=D, requires_grad=grad)


# ---------------------------------------------------------------- BYOL / SimSiam


def test_normalized_regression_and_negative_cosine_by_hand() -> None:
    p, z = t([[1.0, 0.0], [0.0, 2.0]]), t([[1.0, 1.0], [0.0, -3.0]])
    cosines = [1 / math.sqrt(2), -1.0]
    assert float(normalized_regression(p, z)) == pytest.approx(2 - 2 * sum(cosines) / 2, abs=1e-6)
    assert float(negative_cosine(p, z)) == pytest.approx(-sum(cosines) / 2, abs=1e-6)


def test_byol_loss_is_symmetric_over_view_pairs_and_never_differentiates_the_targets() -> None:
    p1, p2 = t([[1.0, 0.0]], grad=True), t([[0.0, 1.0]], grad=True)
    z1, z2 = t([[1.0, 1.0]], grad=True), t([[3.0, 0.0]], grad=True)
    loss = byol_loss([p1, p2], [z1, z2])
    # l(p2, z1) + l(p1, z2) = (2 - 2 / sqrt 2) + (2 - 2); never l(p1, z1) or l(p2, z2)
    assert float(loss.detach()) == pytest.approx(2 - math.sqrt(2), abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the target branch
    assert p1.grad is not None and p2.grad is not None and float(p2.grad.abs().sum()) > 0


def test_simsiam_loss_by_hand_with_stop_gradient() -> None:
    p1, p2 = t([[1.0, 0.0]], grad=True), t([[1.0, 1.0]], grad=True)
    z1, z2 = t([[0.0, 1.0]], grad=True), t([[1.0, 0.0]], grad=True)
    loss = simsiam_loss(p1, p2, z1, z2)
    # D(p1, z2) / 2 + D(p2, z1) / 2
    assert float(loss.detach()) == pytest.approx(-(1.0 / 2) - (1 / math.sqrt(2)) / 2, abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None
    # d/dp1 of -cos(p1, z2)/2 at p1 = z2 direction is 0 along p1 and the orthogonal component is 0 too
    assert torch.allclose(p1.grad, torch.zeros(1, 2, dtype=D))
    assert normalized_std(t([[1.0, 2.0]] * 4)) == 0  # collapse: every embedding the same


# ---------------------------------------------------------------- MoCo


def test_moco_logits_layout_and_infonce_by_hand() -> None:
    q = t([[1.0, 0.0], [0.0, 1.0]])
    k = t([[0.6, 0.8], [0.0, 1.0]])
    queue = t([[1.0, 0.0], [0.0, -1.0], [0.8, 0.6]])
    logits = moco_logits(q, k, queue, temperature=0.5)
    assert logits.shape == (2, 4)
    assert torch.allclose(logits, t([[1.2, 2.0, 0.0, 1.6], [2.0, 0.0, -2.0, 1.2]]), atol=1e-12)
    expected = [-row[0] + math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert float(moco_loss(q, k, queue, 0.5)) == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_enqueue_wraps_the_pointer_and_replaces_the_oldest_keys() -> None:
    queue = torch.zeros(2, 5, 1)
    pointer = torch.tensor([3])
    keys = torch.arange(1.0, 9.0).view(2, 4, 1)  # view 0: 1..4, view 1: 5..8
    enqueue_(queue, pointer, keys)
    assert queue[0].flatten().tolist() == [3, 4, 0, 1, 2] and queue[1].flatten().tolist() == [7, 8, 0, 5, 6]
    assert int(pointer) == 2  # (3 + 4) % 5
    enqueue_(queue[0], pointer, torch.tensor([[9.0]]))
    assert queue[0].flatten().tolist() == [3, 4, 9, 1, 2] and int(pointer) == 3
    with pytest.raises(ValueError, match="do not fit"):
        enqueue_(queue[0], pointer, torch.zeros(6, 1))


# ---------------------------------------------------------------- Barlow Twins


def test_barlow_twins_cross_correlation_and_off_diagonal_by_hand() -> None:
    z1 = t([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    z2 = t([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])

    def standardise(column: list[float]) -> list[float]:
        mean = sum(column) / len(column)
        var = sum((v - mean) ** 2 for v in column) / len(column)  # biased, as BatchNorm1d
        return [(v - mean) / math.sqrt(var + 1e-5) for v in column]

    a = list(zip(*[standardise([r[j] for r in z1.tolist()]) for j in range(2)], strict=True))
    b = list(zip(*[standardise([r[j] for r in z2.tolist()]) for j in range(2)], strict=True))
    c = [[sum(a[n][i] * b[n][j] for n in range(3)) / 3 for j in range(2)] for i in range(2)]
    assert torch.allclose(batch_standardize(z1), torch.tensor(a, dtype=D), atol=1e-12)
    assert torch.allclose(cross_correlation(z1, z2), t(c), atol=1e-9)
    expected = 0.1 * ((1 - c[0][0]) ** 2 + (1 - c[1][1]) ** 2 + 0.0051 * (c[0][1] ** 2 + c[1][0] ** 2))
    assert float(barlow_twins_loss(z1, z2, lamb=0.0051, scale_loss=0.1)) == pytest.approx(expected, abs=1e-6)
    m = torch.arange(9.0).view(3, 3)
    assert off_diagonal(m).tolist() == [1, 2, 3, 5, 6, 7]


# ---------------------------------------------------------------- VICReg


def test_vicreg_terms_by_hand() -> None:
    z1 = t([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    z2 = t([[1.0, 1.0], [1.0, 0.0], [3.0, 5.0]])
    invariance, variance, covariance = vicreg_terms(z1, z2, eps=1e-4)
    sq = [(a - b) ** 2 for ra, rb in zip(z1.tolist(), z2.tolist(), strict=True) for a, b in zip(ra, rb, strict=True)]
    assert float(invariance) == pytest.approx(sum(sq) / 6, abs=1e-12)

    def var_cov(z: list[list[float]]) -> tuple[float, float]:
        cols = list(zip(*z, strict=True))
        means = [sum(c) / 3 for c in cols]
        cov = [[sum((z[n][i] - means[i]) * (z[n][j] - means[j]) for n in range(3)) / 2 for j in range(2)]
               for i in range(2)]
        hinge = sum(max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(2)) / 2
        return hinge, (cov[0][1] ** 2 + cov[1][0] ** 2) / 2

    (v1, c1), (v2, c2) = var_cov(z1.tolist()), var_cov(z2.tolist())
    assert float(variance) == pytest.approx(v1 + v2, abs=1e-6)
    assert float(covariance) == pytest.approx(c1 + c2, abs=1e-6)
    tight = t([[0.0, 0.0], [0.1, 0.2], [0.2, 0.1]])  # std < 1: the hinge is active on both dimensions
    assert float(vicreg_terms(tight, tight)[1]) > 1.5


# ---------------------------------------------------------------- DINO


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    assert [teacher_temperature(e, 0.04, 0.07, 3) for e in range(5)] == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07 and teacher_temperature(0, 0.04, 0.07, 1) == 0.04


def test_dino_loss_centres_sharpens_and_skips_same_view_pairs() -> None:
    teacher = [t([[1.0, 0.0, 0.0]]), t([[0.0, 2.0, 0.0]])]
    student = [t([[0.5, 0.0, 0.0]], grad=True), t([[0.0, 0.0, 1.0]], grad=True), t([[0.2, 0.1, 0.0]], grad=True)]
    center = t([[0.1, 0.2, 0.3]])

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    targets = [softmax([(v - c) / 0.04 for v, c in zip(x.tolist()[0], center.tolist()[0], strict=True)])
               for x in teacher]
    logs = [[math.log(p) for p in softmax([v / 0.1 for v in s.tolist()[0]])] for s in student]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), never the same view
    expected = sum(-sum(q * lp for q, lp in zip(targets[i], logs[j], strict=True)) for i, j in pairs) / 4
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert all(s.grad is not None for s in student)

    c = torch.zeros(1, 3, dtype=D)
    update_center_(c, [t([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), t([[0.0, 0.0, 4.0], [0.0, 4.0, 0.0]])], momentum=0.9)
    assert c.tolist()[0] == pytest.approx([0.1 * 1.0, 0.1 * 2.0, 0.1 * 2.0])  # 0.9 * 0 + 0.1 * mean of 4 rows


# ---------------------------------------------------------------- momentum and EMA


def test_cosine_momentum_and_ema_by_hand() -> None:
    assert cosine_momentum(0, 100, 0.99) == 0.99 and cosine_momentum(100, 100, 0.99) == 1.0
    assert cosine_momentum(50, 100, 0.99, 0.999) == pytest.approx((0.99 + 0.999) / 2, abs=1e-12)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    target, online = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])]
    ema_parameters_(target, online, 0.75)
    assert target[0].tolist() == [1.5, 1.5]


# ---------------------------------------------------------------- LARS and fixed-lr groups


def test_lars_step_by_hand_adapts_weights_and_leaves_biases_plain() -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02, clip=True)
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # ||g|| = 2
    opt.step()
    trust = min(0.02 * 5 / (2 + 5 * 0.1 + 1e-8) / 0.5, 1.0)  # clipped relative to lr
    d = [(0.0 + 0.1 * 3.0) * trust, (2.0 + 0.1 * 4.0) * trust]
    assert w.tolist()[0] == pytest.approx([3.0 - 0.5 * d[0], 4.0 - 0.5 * d[1]], abs=1e-6)
    assert b.tolist() == pytest.approx([1.0 - 0.5 * 0.5], abs=1e-7)  # bias: no trust ratio, no weight decay
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    before = b.detach().clone()
    opt.step()
    assert b.tolist() == pytest.approx((before - 0.5 * (0.9 * 0.5 + 0.5)).tolist(), abs=1e-7)  # momentum buffer
    built = build_optimizer(OptimSection(name="lars", lr=0.3, weight_decay=1e-4), [w])
    assert isinstance(built, LARS) and built.param_groups[0]["eta"] == 0.02 and built.param_groups[0]["clip"]


def test_a_fixed_lr_group_keeps_its_lr_under_the_schedule() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": True}], lr=0.4)
    scheduler = build_scheduler(ScheduleSection(name="cosine", per="step", warmup_epochs=1), opt, 0.4, 2, 4)
    seen = []
    for _ in range(8):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    assert [s[1] for s in seen] == [0.4] * 8
    assert seen[0][0] == pytest.approx(0.0) and seen[4][0] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 2)))


# ---------------------------------------------------------------- torchrun: two gloo ranks


def _ddp_worker(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, queue: mp.Queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = len(z1) // 2
    results = {}
    for name in ("barlow", "vicreg"):
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        if name == "barlow":
            loss = barlow_twins_loss(a, b, 0.0051, 0.1)
        else:
            inv, var, cov = vicreg_terms(a, b)
            loss = 25 * inv + 25 * var + cov
        loss.backward()
        results[name] = (float(loss.detach()), a.grad.clone(), b.grad.clone())
    mine = z1[rank * n:(rank + 1) * n]
    results["keys"] = gather_no_grad(mine)
    results["centre"] = global_row_mean(mine)
    results["local"] = float(barlow_twins_loss(mine, z2[rank * n:(rank + 1) * n], gather=False))
    queue.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()


def test_barlow_and_vicreg_statistics_span_every_rank_with_gradients() -> None:
    """Each rank holds half the batch: the loss and (trainer-weighted, summed) gradients equal one process
    on the whole batch; MoCo's gathered keys and DINO's centre are every rank's, in rank order."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 5, generator=g, dtype=D), torch.randn(8, 5, generator=g, dtype=D)
    results = dict(run_two_gloo_ranks(_ddp_worker, z1, z2))
    for name in ("barlow", "vicreg"):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        if name == "barlow":
            full = barlow_twins_loss(a, b, 0.0051, 0.1)
        else:
            inv, var, cov = vicreg_terms(a, b)
            full = 25 * inv + 25 * var + cov
        full.backward()
        # the trainer weights each rank's loss by its share (1/2) and sums the gradients over ranks
        assert (results[0][name][0] + results[1][name][0]) / 2 == pytest.approx(float(full.detach()), rel=1e-9)
        grad_a = torch.cat([results[r][name][1] for r in (0, 1)]) / 2
        grad_b = torch.cat([results[r][name][2] for r in (0, 1)]) / 2
        assert torch.allclose(grad_a, a.grad, atol=1e-9) and torch.allclose(grad_b, b.grad, atol=1e-9)
    assert torch.equal(results[0]["keys"], z1) and torch.equal(results[1]["keys"], z1)
    assert torch.allclose(results[1]["centre"], z1.mean(dim=0, keepdim=True), atol=1e-12)
    assert results[0]["local"] == pytest.approx(float(barlow_twins_loss(z1[:4], z2[:4])), rel=1e-9)
    assert F.mse_loss(z1, z2) > 0  # a sanity check that the data are not degenerate
