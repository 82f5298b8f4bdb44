"""The distillation zoo's losses as pure functions, in float64, against values worked out by hand
or by an independent (numpy, loop-by-loop) formula, and against the conventions that are easy
to get wrong: which side is the target, which dimension is normalised, squared or plain
distances, means or sums, pooling, and that no gradient reaches the teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.methods.losses import kl_term
from engine.methods.zoo.at import at_loss
from engine.methods.zoo.cc import cc_loss
from engine.methods.zoo.dkd import dkd_loss, dkd_parts, warmup_factor
from engine.methods.zoo.fitnet import ConvReg, hint_loss
from engine.methods.zoo.kdsvd import kdsvd_loss, singular_vectors
from engine.methods.zoo.nst import nst_loss
from engine.methods.zoo.pkt import pkt_loss
from engine.methods.zoo.rkd import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from engine.methods.zoo.sp import sp_loss
from engine.methods.zoo.vid import VIDRegressor, vid_nll

TOL = 1e-6


def rand(*shape: int, seed: int = 0, relu: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.relu() if relu else x


def close(a: torch.Tensor | float, b: torch.Tensor | float) -> bool:
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    return abs(a - b) < TOL * max(1.0, abs(b))


def assert_student_only_gradient(loss_fn, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """The loss is differentiable in the student and never sends a gradient to the teacher."""
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss_fn(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def np_pool(x: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a (B, C, H, H) array to (B, C, size, size) with equal blocks."""
    b, c, h, _ = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


# ---------------------------------------------------------------- at


def np_at(s: np.ndarray, t: np.ndarray, p: float) -> float:
    def att(f: np.ndarray) -> np.ndarray:
        a = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)
    return float(((att(s) - att(t)) ** 2).mean())


def test_at_matches_an_independent_formula_and_pools_the_larger_map() -> None:
    s, t = rand(3, 4, 4, 4, seed=1, relu=True), rand(3, 6, 2, 2, seed=2, relu=True)
    assert close(at_loss(s, t), np_at(np_pool(s.numpy(), 2), t.numpy(), 2.0))
    assert close(at_loss(t, s), np_at(t.numpy(), np_pool(s.numpy(), 2), 2.0))  # either side is pooled


def test_at_hand_value() -> None:
    # one sample, one channel, two positions: a_s = (1, 0), a_t = (1, 1) / sqrt(2) after normalising
    s = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)
    expected = ((1 - 1 / math.sqrt(2)) ** 2 + (0 - 1 / math.sqrt(2)) ** 2) / 2
    assert close(at_loss(s, t), expected)


def test_at_normalises_each_sample_over_positions_and_is_symmetric() -> None:
    s, t = rand(3, 4, 4, 4, seed=1, relu=True), rand(3, 4, 4, 4, seed=2, relu=True)
    scaled = s.clone()
    scaled[1] *= 10.0  # one sample's scale: invisible after per-sample normalisation
    assert close(at_loss(scaled, t), float(at_loss(s, t)))
    assert close(at_loss(t, s), float(at_loss(s, t)))


def test_at_uses_absolute_values() -> None:
    s, t = rand(2, 3, 4, 4, seed=3), rand(2, 3, 4, 4, seed=4)  # with negative entries
    assert close(at_loss(s, t, 2.0), np_at(s.numpy(), t.numpy(), 2.0))
    assert close(at_loss(s, t, 1.0), np_at(s.numpy(), t.numpy(), 1.0))
    assert not close(at_loss(s, t, 1.0), float(at_loss(s.relu(), t.relu(), 1.0)))
    assert_student_only_gradient(at_loss, s, t)


# ---------------------------------------------------------------- sp


def test_sp_hand_value() -> None:
    # G_s = I; G_t = all 2s, rows normalised to 1/sqrt(2): sum of squares 4 - 2 sqrt(2), / B^2 = 4
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert close(sp_loss(s, t), 1 - math.sqrt(2) / 2)


def test_sp_matches_an_independent_formula_with_row_normalised_gram_matrices() -> None:
    s, t = rand(5, 4, 2, 2, seed=1, relu=True), rand(5, 7, 3, 3, seed=2, relu=True)  # other widths and sizes

    def gram(x: np.ndarray, frobenius: bool = False) -> np.ndarray:
        g = x.reshape(len(x), -1) @ x.reshape(len(x), -1).T
        return g / (np.linalg.norm(g) if frobenius else np.linalg.norm(g, axis=1, keepdims=True))

    ns, nt = s.numpy(), t.numpy()
    assert close(sp_loss(s, t), ((gram(nt) - gram(ns)) ** 2).sum() / 25)
    assert not close(sp_loss(s, t), ((gram(nt, True) - gram(ns, True)) ** 2).sum() / 25)  # not the Frobenius form
    assert close(sp_loss(t, s), float(sp_loss(s, t)))  # symmetric in value
    assert_student_only_gradient(sp_loss, s, t)


# ---------------------------------------------------------------- cc


def test_cc_hand_value_pairs_consecutive_rows() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    # |s - t| = [[1, 2], [2, 3], [1, 1]]: rows (0, 1) -> 1*2 + 2*3 = 8, rows (1, 2) -> 2 + 3 = 5
    assert close(cc_loss(s, t), 6.5)
    order = torch.tensor([0, 2, 1])  # |s - t| = [[1, 2], [1, 1], [2, 3]]: 3 and 5
    assert close(cc_loss(s[order], t[order]), 4.0)
    assert close(cc_loss(t, s), 6.5)


def test_cc_trains_both_embeddings() -> None:
    # RepDistiller's teacher embedding is trainable: the loss must not detach it
    s, t = rand(4, 3, seed=1).requires_grad_(True), rand(4, 3, seed=2).requires_grad_(True)
    cc_loss(s, t).backward()
    assert s.grad is not None and t.grad is not None and t.grad.abs().sum() > 0


# ---------------------------------------------------------------- rkd


def np_rkd(s: np.ndarray, t: np.ndarray, squared: bool = False) -> tuple[float, float]:
    def dist(x: np.ndarray) -> np.ndarray:
        d = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
        d = d if squared else np.sqrt(d)
        return d / d[d > 0].mean()

    def cosines(x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(len(x)):
            for j in range(len(x)):
                for k in range(len(x)):
                    u, v = x[j] - x[i], x[k] - x[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out.append(0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return np.array(out)

    def smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
        d = np.abs(a - b)
        return float(np.where(d < 1, 0.5 * d**2, d - 0.5).mean())

    return smooth_l1(dist(s), dist(t)), smooth_l1(cosines(s), cosines(t))


def test_rkd_distance_hand_value_uses_plain_distances() -> None:
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # distances 3, 4, 5: mean 4
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # 1, 1, sqrt 2
    mt = (2 + math.sqrt(2)) / 3
    diffs = [3 / 4 - 1 / mt, 4 / 4 - 1 / mt, 5 / 4 - math.sqrt(2) / mt]  # all below 1: 0.5 d^2
    assert close(rkd_distance_loss(s, t), 2 * sum(0.5 * d * d for d in diffs) / 9)  # 6 off-diagonal of 9
    assert close(pairwise_distances(s)[1, 2], 5.0)
    assert close(pairwise_distances(s, squared=True)[1, 2], 25.0)


def test_rkd_matches_an_independent_formula_not_the_squared_one() -> None:
    s, t = rand(5, 6, seed=1), rand(5, 9, seed=2)
    d_plain, a = np_rkd(s.numpy(), t.numpy())
    d_squared, _ = np_rkd(s.numpy(), t.numpy(), squared=True)
    assert close(rkd_distance_loss(s, t), d_plain)
    assert not close(rkd_distance_loss(s, t), d_squared)
    assert close(rkd_angle_loss(s, t), a)
    assert close(rkd_loss(s, t), 25 * d_plain + 50 * a)
    assert close(rkd_loss(s, t, 2.0, 3.0), 2 * d_plain + 3 * a)


def test_rkd_is_scale_and_translation_free_and_never_trains_the_teacher() -> None:
    s, t = rand(5, 6, seed=1), rand(5, 6, seed=2)
    assert close(rkd_distance_loss(7 * s, t), float(rkd_distance_loss(s, t)))
    assert close(rkd_angle_loss(3 * s + 1, t), float(rkd_angle_loss(s, t)))
    assert_student_only_gradient(rkd_loss, s, t)


# ---------------------------------------------------------------- pkt


def np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def cond(x: np.ndarray) -> np.ndarray:
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        sim = (x @ x.T + 1) / 2
        return sim / sim.sum(axis=1, keepdims=True)
    ps, pt = cond(s), cond(t)
    return float((pt * np.log((pt + eps) / (ps + eps))).mean())


def test_pkt_matches_an_independent_formula_and_the_teacher_is_the_target() -> None:
    s, t = rand(6, 5, seed=1), rand(6, 8, seed=2)
    assert close(pkt_loss(s, t), np_pkt(s.numpy(), t.numpy()))
    assert not close(pkt_loss(t, s), float(pkt_loss(s, t)))  # KL(teacher || student), not the reverse
    assert close(pkt_loss(t, s), np_pkt(t.numpy(), s.numpy()))
    assert_student_only_gradient(pkt_loss, s, t)


def test_pkt_normalises_each_sample_not_each_feature() -> None:
    s, t = rand(6, 5, seed=1), rand(6, 5, seed=2)
    scaled = s.clone()
    scaled[2] *= 5.0  # a sample's length does not change its cosines
    assert close(pkt_loss(scaled, t), float(pkt_loss(s, t)))
    per_feature = s / s.norm(dim=0, keepdim=True)
    assert not close(pkt_loss(per_feature, t), float(pkt_loss(s, t)))


def test_pkt_hand_value_for_identical_and_orthogonal_pairs() -> None:
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    orth = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # cosines shift to (1 + cos) / 2: teacher rows (1/2, 1/2), student rows (2/3, 1/3) and (1/3, 2/3);
    # KL per row 0.5 log(3/4) + 0.5 log(3/2) = 0.5 log(9/8); two rows over 4 entries (eps: 1e-7)
    assert abs(float(pkt_loss(orth, same)) - math.log(9 / 8) / 4) < 1e-6
    assert abs(float(pkt_loss(same, same))) < 1e-12


# ---------------------------------------------------------------- nst


def np_nst(s: np.ndarray, t: np.ndarray) -> float:
    def norm(x: np.ndarray) -> np.ndarray:
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return x / np.linalg.norm(x, axis=2, keepdims=True)

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([(a[n, i] @ b[n, j]) ** 2 for n in range(len(a))
                              for i in range(a.shape[1]) for j in range(b.shape[1])]))
    s, t = norm(s), norm(t)
    return k(t, t) + k(s, s) - 2 * k(s, t)


def test_nst_hand_values_use_the_squared_kernel() -> None:
    one = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    other = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    diag = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)
    assert close(nst_loss(one, other), 2.0)  # 1 + 1 - 2 * 0
    assert close(nst_loss(one, diag), 1.0)  # 1 + 1 - 2 * (1/sqrt 2)^2; a linear kernel would give 2 - sqrt 2
    assert close(nst_loss(diag, diag), 0.0)


def test_nst_matches_an_independent_formula_with_pooling_and_other_widths() -> None:
    s, t = rand(2, 3, 4, 4, seed=1, relu=True), rand(2, 5, 2, 2, seed=2, relu=True)
    assert close(nst_loss(s, t), np_nst(np_pool(s.numpy(), 2), t.numpy()))
    assert close(nst_loss(t, s), float(nst_loss(s, t)))  # the MMD is symmetric in value
    assert_student_only_gradient(nst_loss, s, t)


def test_nst_normalises_each_channel_over_positions() -> None:
    s, t = rand(2, 3, 4, 4, seed=1, relu=True), rand(2, 3, 4, 4, seed=2, relu=True)
    scaled = s.clone()
    scaled[:, 1] *= 4.0  # one channel's scale: invisible after normalising over its positions
    assert close(nst_loss(scaled, t), float(nst_loss(s, t)))
    spatially = s.clone()
    spatially[:, :, 0, 0] *= 4.0  # one position across channels: visible
    assert not close(nst_loss(spatially, t), float(nst_loss(s, t)))


# ---------------------------------------------------------------- kdsvd


def np_kdsvd(student: list[np.ndarray], teacher: list[np.ndarray], teacher_signs: list[np.ndarray],
             k: int = 1) -> float:
    """Loop-by-loop KDSVD; the teacher's singular-vector signs are SVD-defined, so they are given."""
    total, prev = 0.0, None
    batch = student[0].shape[0]
    for s_map, t_map, sign in zip(student, teacher, teacher_signs, strict=True):
        vs_all, vt_all = [], []
        for n in range(batch):
            xs = s_map[n].reshape(s_map.shape[1], -1).T
            xt = t_map[n].reshape(t_map.shape[1], -1).T
            vhs = np.linalg.svd(xs, full_matrices=False)[2]
            _, st, vht = np.linalg.svd(xt, full_matrices=False)
            weights = st[:k] / np.linalg.norm(st[:k])
            vt = vht[:k].T * sign[n]  # (C, k)
            cand = vhs[:k + 3].T  # (C, k + 3)
            vs = np.zeros_like(vt)
            for j in range(k):
                cos = cand.T @ vt[:, j]
                best = np.argmax(np.abs(cos))
                vs[:, j] = cand[:, best] * np.sign(cos[best])
            vs_all.append(vs * weights)
            vt_all.append(vt * weights)
        if prev is not None:
            for n in range(batch):
                for c in range(vs_all[n].shape[0]):
                    for c2 in range(prev[0][n].shape[0]):
                        for j in range(k):
                            rs = math.exp(-(vs_all[n][c, j] - prev[0][n][c2, j]) ** 2 / 8)
                            rt = math.exp(-(vt_all[n][c, j] - prev[1][n][c2, j]) ** 2 / 8)
                            total += (rs - rt) ** 2
        prev = (vs_all, vt_all)
    return total / batch


def teacher_signs(teacher: list[torch.Tensor], k: int) -> list[np.ndarray]:
    """+-1 per sample and vector: how the implementation's SVD oriented the teacher's vectors."""
    signs = []
    for t_map in teacher:
        _, v = singular_vectors(t_map, k)
        ref = np.stack([np.linalg.svd(t_map[n].reshape(t_map.shape[1], -1).T.numpy(), full_matrices=False)[2][:k].T
                        for n in range(len(t_map))])
        signs.append(np.sign((v.numpy() * ref).sum(1)))
    return signs


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_an_independent_formula(k: int) -> None:
    student = [rand(2, 4, 4, 4, seed=1), rand(2, 6, 2, 2, seed=2)]
    teacher = [rand(2, 4, 4, 4, seed=3), rand(2, 6, 2, 2, seed=4)]
    expected = np_kdsvd([s.numpy() for s in student], [t.numpy() for t in teacher], teacher_signs(teacher, k), k)
    assert close(kdsvd_loss(student, teacher, k), expected)


def test_kdsvd_is_zero_for_the_teacher_itself_and_blind_to_the_students_sign() -> None:
    student = [rand(2, 4, 4, 4, seed=1), rand(2, 6, 2, 2, seed=2)]
    teacher = [rand(2, 4, 4, 4, seed=3), rand(2, 6, 2, 2, seed=4)]
    assert close(kdsvd_loss(teacher, teacher), 0.0)
    assert close(kdsvd_loss([-s for s in student], teacher), float(kdsvd_loss(student, teacher)))
    assert not close(kdsvd_loss([t[:, torch.tensor([1, 0, 3, 2])] if t.shape[1] == 4 else t for t in teacher],
                                teacher), 0.0)  # the channels' order matters


def test_kdsvd_gradients_reach_the_student_only_and_stay_finite_with_dead_channels() -> None:
    student = [rand(2, 4, 4, 4, seed=1, relu=True), rand(2, 6, 2, 2, seed=2, relu=True)]
    teacher = [rand(2, 4, 4, 4, seed=3, relu=True), rand(2, 6, 2, 2, seed=4, relu=True)]
    student[1][0, 3:] = 0.0  # sample 0: three dead channels, repeated zero singular values
    s = [x.clone().requires_grad_(True) for x in student]
    t = [x.clone().requires_grad_(True) for x in teacher]
    kdsvd_loss(s, t).backward()
    assert all(x.grad is None for x in t)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)
    assert s[0].grad.abs().sum() > 0


def test_kdsvd_refuses_unequal_widths() -> None:
    with pytest.raises(ValueError, match="equal channel counts"):
        kdsvd_loss([rand(2, 4, 4, 4), rand(2, 6, 2, 2)], [rand(2, 8, 4, 4), rand(2, 6, 2, 2)])


# ---------------------------------------------------------------- dkd


def mdistiller_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temp: float) -> float:
    """mdistiller's formula as written there: masks, log of summed probabilities, the -1000 offset."""
    gt = torch.zeros_like(s).scatter_(1, y.view(-1, 1), 1).bool()
    ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temp**2 / len(y)
    nckd = F.kl_div(F.log_softmax(s / temp - 1000.0 * gt, 1), F.softmax(t / temp - 1000.0 * gt, 1),
                    reduction="sum") * temp**2 / len(y)
    return float(alpha * tckd + beta * nckd)


def test_dkd_matches_mdistillers_formula() -> None:
    s, t = 3 * rand(5, 7, seed=1), 3 * rand(5, 7, seed=2)
    y = torch.tensor([0, 3, 6, 3, 1])
    assert close(dkd_loss(s, t, y), mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0))
    assert close(dkd_loss(s, t, y, 0.5, 2.0, 2.0), mdistiller_dkd(s, t, y, 0.5, 2.0, 2.0))
    assert not close(dkd_loss(t, s, y), float(dkd_loss(s, t, y)))  # KL(teacher || student), not the reverse


def test_dkd_hand_value_and_the_papers_decomposition_of_kd() -> None:
    s = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    tckd, nckd = dkd_parts(s, t, y, temperature=1.0)
    e = math.e
    ps, pt = e / (e + 2), 1 / (e + 2)  # target-class probabilities
    assert close(tckd, pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))
    qt = (e / (e + 1), 1 / (e + 1))  # teacher over the non-targets; the student's is uniform
    assert close(nckd, sum(q * math.log(q / 0.5) for q in qt))
    # Zhao et al., Eq. 1: KD = TCKD + (1 - p_t^target) * NCKD, at any temperature
    s, t, y = 3 * rand(6, 5, seed=3), 3 * rand(6, 5, seed=4), torch.tensor([0, 1, 2, 3, 4, 0])
    for temp in (1.0, 4.0):
        tckd, nckd = dkd_parts(s, t, y, temp)
        weight = 1 - F.softmax(t / temp, 1).gather(1, y.view(-1, 1)).view(-1)
        per_row = [dkd_parts(s[i:i + 1], t[i:i + 1], y[i:i + 1], temp) for i in range(6)]
        decomposed = sum(a + w * b for (a, b), w in zip(per_row, weight, strict=True)) / 6
        assert close(decomposed, float(kl_term(s, t, temp)))
        assert close(sum(a for a, _ in per_row) / 6, float(tckd))


def test_dkd_never_trains_the_teacher() -> None:
    y = torch.tensor([0, 1, 2])
    assert_student_only_gradient(lambda s, t: dkd_loss(s, t, y), rand(3, 4, seed=1), rand(3, 4, seed=2))


def test_dkd_warmup_factor() -> None:
    assert warmup_factor(1, 20) == 1 / 20  # mdistiller's epochs are 1-based: never a zero factor
    assert warmup_factor(10, 20) == 0.5
    assert warmup_factor(20, 20) == 1.0
    assert warmup_factor(240, 20) == 1.0
    assert warmup_factor(1, 0) == 1.0


# ---------------------------------------------------------------- fitnet


def test_hint_loss_is_the_mean_squared_error_and_never_trains_the_teacher() -> None:
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    assert close(hint_loss(s, t), float(((s - t) ** 2).sum()) / s.numel())
    assert_student_only_gradient(hint_loss, s, t)


@pytest.mark.parametrize(("s_size", "t_size", "conv"), [
    (8, 4, "Conv2d"),  # twice the teacher's size: 3x3 stride 2
    (4, 8, "ConvTranspose2d"),  # half: 4x4 transposed, stride 2
    (4, 4, "Conv2d"),  # equal: 1x1
    (6, 4, "Conv2d"),  # larger: valid 3x3
])
def test_conv_regressor_maps_the_student_shape_onto_the_teachers(s_size: int, t_size: int, conv: str) -> None:
    reg = ConvReg(torch.Size([2, 3, s_size, s_size]), torch.Size([2, 5, t_size, t_size]))
    assert type(reg.conv).__name__ == conv
    assert reg(torch.randn(2, 3, s_size, s_size)).shape == (2, 5, t_size, t_size)


def test_conv_regressor_refuses_a_student_map_too_small() -> None:
    with pytest.raises(ValueError, match="cannot regress a 3x3 student map onto a 8x8"):
        ConvReg(torch.Size([2, 3, 3, 3]), torch.Size([2, 5, 8, 8]))


# ---------------------------------------------------------------- vid


def test_vid_nll_hand_value() -> None:
    mu = torch.tensor([[[[1.0]], [[0.0]]]], dtype=torch.float64)  # (1, 2, 1, 1)
    target = torch.tensor([[[[3.0]], [[1.0]]]], dtype=torch.float64)
    log_scale = torch.tensor([0.0, 1.0], dtype=torch.float64)
    var = [math.log(2) + 1e-5, math.log(1 + math.e) + 1e-5]  # softplus + eps, per channel
    expected = (0.5 * (4 / var[0] + math.log(var[0])) + 0.5 * (1 / var[1] + math.log(var[1]))) / 2
    assert close(vid_nll(mu, target, log_scale), expected)


def test_vid_starts_at_the_initial_variance_and_regresses_student_to_teacher() -> None:
    torch.manual_seed(0)
    reg = VIDRegressor(3, 3, init_pred_var=5.0, eps=1e-5).double()
    variance = F.softplus(reg.log_scale) + 1e-5  # log_scale was made in float32: 1e-6, not 1e-12
    assert torch.allclose(variance, torch.full((3,), 5.0, dtype=torch.float64), rtol=0, atol=1e-6)
    s, t = rand(2, 3, 8, 8, seed=1), rand(2, 3, 4, 4, seed=2)  # the larger map is pooled
    mu = reg.regressor(F.adaptive_avg_pool2d(s, 4))
    assert close(reg(s, t), (0.5 * ((mu - t) ** 2 / 5.0 + math.log(5.0))).mean())
    assert not close(reg(t, s), reg(s, t))  # the regressor reads the student, the target is the teacher
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    reg(s, t).backward()
    assert t.grad is None and s.grad is not None
    assert reg.log_scale.grad is not None and reg.log_scale.grad.abs().sum() > 0
