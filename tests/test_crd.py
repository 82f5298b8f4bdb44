"""CRD: the NCE loss by hand, the memory's scores against the reference's gather-then-bmm formula,
its normalisation constants and update rule, negative sampling in both modes, the method through
the trainer, a bit-identical resume (student, embeddings, both banks, Z) and, under two gloo
processes, banks that stay identical on every rank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.methods.zoo.crd import ContrastMemory, ContrastSampler, Embed, contrast_loss
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, EXIT_INTERRUPTED, Trainer, train
from tests.conftest import write_recipe
from tests.test_distill import BASE, assert_equal_states, clone_state, fake_checkpoint, make_trainer
from tui.launcher import create_runs, prepare

D = torch.float64

# ---------------------------------------------------------------- the loss


def test_contrast_loss_by_hand() -> None:
    scores = torch.tensor([[0.5, 0.1, 0.2], [2.0, 0.4, 0.0]], dtype=D)
    n_data, eps = 4, 1e-7
    noise = 2 / n_data  # K * Pn with K = 2 negatives
    rows = [-(math.log(p / (p + noise + eps)) + sum(math.log(noise / (q + noise + eps)) for q in negs))
            for p, *negs in scores.tolist()]
    assert float(contrast_loss(scores, n_data)) == pytest.approx(sum(rows) / 2, abs=1e-12)
    # the positive is column 0: a larger positive lowers the loss, a larger negative raises it
    assert contrast_loss(scores * torch.tensor([2.0, 1, 1], dtype=D), n_data) < contrast_loss(scores, n_data)
    assert contrast_loss(scores * torch.tensor([1.0, 2, 1], dtype=D), n_data) > contrast_loss(scores, n_data)


def test_embed_is_unit_norm_in_fp32_under_autocast() -> None:
    embed = Embed(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = embed(torch.randn(3, 6, 1, 1))
    assert v.dtype == torch.float32 and torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-6)


# ---------------------------------------------------------------- the memory


def memory64(n: int = 6, d: int = 3, t: float = 0.5, m: float = 0.5) -> ContrastMemory:
    torch.manual_seed(0)
    return ContrastMemory(d, n, t, m).double()


def test_memory_init_is_uniform_in_the_reference_range() -> None:
    torch.manual_seed(0)
    memory = ContrastMemory(128, 500)
    stdv = 1 / math.sqrt(128 / 3)
    for bank in (memory.memory_s, memory.memory_t):
        assert bank.shape == (500, 128) and float(bank.abs().max()) <= stdv
        assert float(bank.min()) < -0.95 * stdv and float(bank.max()) > 0.95 * stdv
    assert not torch.equal(memory.memory_s, memory.memory_t)
    assert memory.z.tolist() == [-1.0, -1.0]


def test_scores_match_gather_then_bmm_and_z_is_set_once_from_the_first_batch() -> None:
    memory = memory64()
    g = torch.Generator().manual_seed(1)
    v_s, v_t = (F.normalize(torch.randn(2, 3, generator=g, dtype=D), dim=1) for _ in range(2))
    idx = torch.tensor([[4, 0, 1, 5], [2, 3, 3, 0]])
    bank_s, bank_t = memory.memory_s.clone(), memory.memory_t.clone()

    def reference(bank: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # crd/memory.py's formula
        return torch.exp(torch.bmm(bank[idx.view(-1)].view(2, 4, 3), v.view(2, 3, 1)).squeeze(2) / 0.5)

    raw_s, raw_t = reference(bank_t, v_s), reference(bank_s, v_t)  # student anchors read the teacher bank
    out_s, out_t = memory(v_s, v_t, idx)
    z_s, z_t = float(raw_s.mean()) * 6, float(raw_t.mean()) * 6
    assert memory.z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)
    assert torch.allclose(out_s, raw_s / z_s, atol=1e-12) and torch.allclose(out_t, raw_t / z_t, atol=1e-12)
    # a second batch is divided by the same constants
    out_s2, _ = memory(v_t, v_s, idx)
    assert torch.allclose(out_s2, reference(bank_t, v_t) / z_s, atol=1e-12)
    assert memory.z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)


def test_z_comes_from_the_checkpoint_after_load_state_dict() -> None:
    a, b = memory64(), memory64()
    v, w = F.normalize(torch.ones(1, 3, dtype=D), dim=1), F.normalize(torch.tensor([[1.0, -1.0, 0.0]], dtype=D), dim=1)
    idx = torch.tensor([[0, 1, 2]])
    a(v, v, idx)
    b(w, w, idx)  # each estimated its own Z
    assert not torch.equal(a.z, b.z)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(v, v, idx)[0], a(v, v, idx)[0]) and torch.equal(b.z, a.z)
    b.load_state_dict(memory64().state_dict())  # a checkpoint from before the first batch: estimate again
    b(v, v, idx)
    assert torch.equal(b.z, a.z)  # the same first batch as a's, so the same constants


def test_update_moves_only_the_batch_rows_with_momentum_then_renormalises() -> None:
    memory = memory64(n=3, d=2, m=0.5)
    memory.memory_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=D))
    memory.memory_t.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]], dtype=D))
    v_s = torch.tensor([[0.0, 1.0], [0.6, -0.8]], dtype=D)
    v_t = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=D)
    memory.update(v_s, v_t, torch.tensor([0, 2]))
    r = 1 / math.sqrt(2)
    # row 0: 0.5 [1, 0] + 0.5 [0, 1] -> [r, r]; row 2: 0.5 [0.6, 0.8] + 0.5 [0.6, -0.8] = [0.6, 0] -> [1, 0]
    assert torch.allclose(memory.memory_s, torch.tensor([[r, r], [0.0, 1.0], [1.0, 0.0]], dtype=D), atol=1e-12)
    # teacher bank with the teacher rows: [r, r] and 0.5 [0.8, 0.6] + 0.5 [0, -1] = [0.4, -0.2] -> unit
    expected_t = torch.tensor([[r, r], [1.0, 0.0], [2 / math.sqrt(5), -1 / math.sqrt(5)]], dtype=D)
    assert torch.allclose(memory.memory_t, expected_t, atol=1e-12)


# ---------------------------------------------------------------- negative sampling

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 1, 0])  # counts 4, 3, 5: negatives 8, 9, 7


def draws(sampler: ContrastSampler, anchors: torch.Tensor, times: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([sampler(anchors, g) for _ in range(times)])  # (times, B, 1 + k)


@pytest.mark.parametrize("k", [6, 8, 20])  # all distinct; class 2 (7 negatives) with replacement; all
def test_exact_mode_positive_is_the_row_and_negatives_never_its_class(k: int) -> None:
    anchors = torch.tensor([0, 3, 5, 11])
    out = draws(ContrastSampler(LABELS, k, "exact"), anchors, 300)
    assert out.shape == (300, 4, 1 + k)
    assert torch.equal(out[:, :, 0], anchors.expand(300, 4))
    for b, row in enumerate(anchors.tolist()):
        negatives = out[:, b, 1:]
        own = int(LABELS[row])
        assert not bool((LABELS[negatives] == own).any())
        pool = set((own != LABELS).nonzero().flatten().tolist())
        assert set(negatives.flatten().tolist()) == pool  # every other-class row gets drawn
        if k <= len(pool):  # the reference draws without replacement when it can
            assert all(len(set(r)) == k for r in negatives.tolist())
        else:
            assert any(len(set(r)) < k for r in negatives.tolist())


def test_relax_mode_positive_is_any_row_of_the_class_and_negatives_still_other_classes() -> None:
    anchors = torch.tensor([5, 3])
    out = draws(ContrastSampler(LABELS, 4, "relax"), anchors, 200)
    assert set(out[:, 0, 0].tolist()) == {5, 6, 7, 8, 9} and set(out[:, 1, 0].tolist()) == {3, 4, 10}
    assert not bool((LABELS[out[:, 0, 1:]] == 2).any()) and not bool((LABELS[out[:, 1, 1:]] == 1).any())


def test_negatives_come_from_the_generator() -> None:
    sampler = ContrastSampler(LABELS, 5)
    anchors = torch.arange(12)
    assert torch.equal(draws(sampler, anchors, 3, seed=7), draws(sampler, anchors, 3, seed=7))
    assert not torch.equal(draws(sampler, anchors, 3, seed=7), draws(sampler, anchors, 3, seed=8))


def test_negatives_are_roughly_uniform_over_the_pool() -> None:
    out = draws(ContrastSampler(LABELS, 3), torch.tensor([0]), 2000)[:, 0, 1:]
    counts = torch.bincount(out.flatten(), minlength=12)[LABELS != 0].double()
    assert float(counts.min()) > 0.8 * 6000 / 8 and float(counts.max()) < 1.2 * 6000 / 8


# ---------------------------------------------------------------- through the trainer

CRD = '[distill.crd]\nnce_k = 24\nfeat_dim = 16\n'


def crd_trainer(tmp_path: Path, extra: str = "") -> Trainer:
    ckpt = fake_checkpoint(tmp_path / "t.pt", "resnet14")
    return make_trainer(tmp_path, "crd", "resnet8", f'[teacher]\ncheckpoint = "{ckpt}"\n[distill]\n{extra}{CRD}')


def test_a_step_trains_student_and_both_embeds_and_updates_only_the_batch_rows(tmp_path: Path) -> None:
    trainer = crd_trainer(tmp_path, "kd_weight = 1\n")
    method = trainer.method
    memory = method.distill_modules["memory"]
    assert memory.memory_s.shape == (len(trainer.data.train), 16)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = [*method.model.parameters(), *method.distill_modules["embed_s"].parameters(),
                 *method.distill_modules["embed_t"].parameters()]
    assert optimized == {id(p) for p in trainable}
    images, labels, indices = next(trainer.data.train.batches(16, shuffle=True, drop_last=False, device="cpu",
                                                              generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="crd: train_step needs each row's index"):
        method.train_step(images, labels, torch.Generator())
    before = clone_state(memory)
    method.train_mode()
    out = method.train_step(images, labels, torch.Generator().manual_seed(0), indices)
    parts = out["loss_ce"] + out["loss_kd"] + out["loss_feat"]
    assert float(out["loss"].detach()) == pytest.approx(float(parts), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for p in method.teacher.model.parameters())
    assert torch.equal(memory.memory_s, before["memory_s"])  # the banks move after the step, not before
    method.after_optimizer_step(1)
    assert bool((memory.z > 0).all())
    for name in ("memory_s", "memory_t"):
        rows = (getattr(memory, name) != before[name]).any(dim=1)
        assert torch.equal(rows.nonzero().flatten(), indices.sort().values)
        assert torch.allclose(getattr(memory, name)[indices].norm(dim=1), torch.ones(16, dtype=torch.float32))


def new_run(tmp_path: Path, text: str, runs: str) -> RunDir:
    recipe = write_recipe(tmp_path, text, f"{runs}.toml")
    return create_runs(prepare(recipe, None, tmp_path / runs), tmp_path / runs)[0]


def test_stopped_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = fake_checkpoint(tmp_path / "t.pt", "resnet14")
    text = BASE.format(method="crd", arch="resnet8") + f'[teacher]\ncheckpoint = "{ckpt}"\n{CRD}'
    reference = new_run(tmp_path, text, "reference")
    assert train(reference.path) == EXIT_FINISHED  # 2 epochs x 3 steps
    stopped = new_run(tmp_path, text, "stopped")
    original = Trainer._step

    def stop_at_step_5(self: Trainer, *args: object) -> dict:
        out = original(self, *args)
        if self.progress.step == 4:  # the 5th step: epoch 2, 2nd batch; the rest of its draws come from the saved RNG
            self.stop_requested = True
        return out

    monkeypatch.setattr(Trainer, "_step", stop_at_step_5)
    assert train(stopped.path) == EXIT_INTERRUPTED
    assert load_checkpoint(stopped.checkpoints / "last.pt")["progress"]["batch_in_epoch"] == 2
    monkeypatch.undo()
    assert train(stopped.path, resume=True) == EXIT_FINISHED
    a, b = (load_checkpoint(r.checkpoints / "last.pt")["modules"] for r in (reference, stopped))
    assert_equal_states(a["model"], b["model"])
    assert_equal_states(a["distill"], b["distill"])  # embed_s, embed_t, memory_s, memory_t, z
    assert {"embed_s.linear.weight", "embed_t.linear.weight", "memory.memory_s", "memory.memory_t",
            "memory.z"} <= a["distill"].keys()
    for bank in ("memory.memory_s", "memory.memory_t"):  # updated rows are unit vectors, initial ones are not
        assert int(((a["distill"][bank].norm(dim=1) - 1).abs() < 1e-6).sum()) >= 40
    assert bool((a["distill"]["memory.z"] > 0).all())


# ---------------------------------------------------------------- two processes


def _ddp_worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        v_s, v_t, indices, contrast, memory = _ddp_case()
        rows = slice(0, 3) if rank == 0 else slice(3, 5)  # unequal shards
        memory(v_s[rows], v_t[rows], contrast[rows])  # the first batch: Z over both ranks' rows
        memory.update(v_s[rows], v_t[rows], indices[rows])
        torch.save(memory.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ContrastMemory]:
    torch.manual_seed(0)
    memory = ContrastMemory(4, 8, 0.5, 0.5)
    v_s, v_t = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    return v_s, v_t, torch.tensor([6, 1, 0, 7, 3]), torch.randint(0, 8, (5, 4)), memory


def test_two_ranks_keep_identical_banks_equal_to_one_process_on_the_global_batch(tmp_path: Path) -> None:
    # fork: the children need nothing but this module, already imported (spawn would import it again)
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_equal_states(r0, r1)
    v_s, v_t, indices, contrast, memory = _ddp_case()
    memory(v_s, v_t, contrast)
    memory.update(v_s, v_t, indices)
    single = memory.state_dict()
    assert torch.equal(r0["memory_s"], single["memory_s"]) and torch.equal(r0["memory_t"], single["memory_t"])
    assert torch.allclose(r0["z"], single["z"], rtol=1e-6)
