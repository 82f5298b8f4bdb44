"""`kdtui diff`: cached predictions, the comparison, its errors and its exports, on real engine runs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import engine.predictions as predictions
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.diff import resolve_checkpoint, run_diff, sheet_geometry
from engine.errors import UserError
from engine.rundir import RunDir
from engine.trainer import EXIT_FINISHED, train
from tests.conftest import ROOT, TINY_RECIPE
from tui.cli import app
from tui.launcher import create_runs, prepare


@dataclass(frozen=True)
class Trained:
    root: Path
    student: RunDir  # resnet8, 2 epochs, a checkpoint per epoch
    teacher: RunDir  # wrn_16_1, 1 epoch, same data and seed


def train_once(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Two real engine runs on the embedded data (tiny settings), trained once per session and shared
    with test_diff_screen.py through a marker file in the session's base temp folder."""
    base = tmp_path_factory.getbasetemp() / "diff-runs"
    done = base / "trained.json"
    if done.is_file():
        paths = json.loads(done.read_text())
        return Trained(Path(paths[0]), RunDir(Path(paths[1])), RunDir(Path(paths[2])))
    base.mkdir()
    recipe = base / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    root = base / "runs"
    runs = []
    student = ["train.epochs=2", "run.name=student"]
    teacher = ["train.epochs=1", "model.arch=wrn_16_1", "run.name=teacher"]
    for overrides in (student, teacher):
        run = create_runs(prepare(recipe, overrides, root), root)[0]
        assert train(run.path) == EXIT_FINISHED
        runs.append(run)
    done.write_text(json.dumps([str(root), *(str(r.path) for r in runs)]))
    return Trained(root, *runs)


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_once(tmp_path_factory)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the one evaluation entry point: each call appends how many models it ran."""
    calls: list[int] = []
    real = predictions._evaluate

    def spy(models: list, *args: object) -> list:
        calls.append(len(models))
        return real(models, *args)

    monkeypatch.setattr(predictions, "_evaluate", spy)
    return calls


# ---------------------------------------------------------------- correctness
def test_counts_match_an_independent_recomputation(trained: Trained) -> None:
    a, b = (trained.student.checkpoints / f"epoch_000{e}.pt" for e in (1, 2))
    diff = run_diff(a, b, "test")
    out = diff.to_json()

    # read the cache files themselves (in the run's predictions/ folder) and recount with plain Python
    cached = []
    for path in (a, b):
        digest = predictions.file_digest(path)
        file = trained.student.predictions / f"{digest[:24]}-test.npz"
        with np.load(file) as npz:
            assert json.loads(str(npz["header"]))["digest"] == digest
            cached.append((npz["labels"].tolist(), npz["top_idx"][:, 0].tolist()))
    (ya, pa), (yb, pb) = cached
    assert ya == yb
    names = diff.class_names
    expect = {"a_right_b_wrong": 0, "a_wrong_b_right": 0, "both_wrong_different": 0, "both_wrong_same": 0}
    listed, per_class = [], {n: 0 for n in names}
    for i, (y, p, q) in enumerate(zip(ya, pa, pb, strict=True)):
        if p == y and q != y:
            expect["a_right_b_wrong"] += 1
        elif p != y and q == y:
            expect["a_wrong_b_right"] += 1
        elif p != y and q != y:
            expect["both_wrong_different" if p != q else "both_wrong_same"] += 1
        if p != q:
            listed.append((i, names[y], names[p], names[q]))
            per_class[names[y]] += 1
    n = len(ya)
    assert out["n"] == n == 1000 and out["split"] == "test"
    assert out["counts"] == expect
    assert out["acc_a"] == pytest.approx(sum(p == y for p, y in zip(pa, ya, strict=True)) / n)
    assert out["acc_b"] == pytest.approx(sum(q == y for q, y in zip(pb, ya, strict=True)) / n)
    assert out["agreement"] == pytest.approx(sum(p == q for p, q in zip(pa, pb, strict=True)) / n)
    assert [(d["index"], d["label"], d["a_pred"], d["b_pred"]) for d in out["disagreements"]] == listed
    assert {k: v["disagreements"] for k, v in out["per_class"].items()} == per_class
    assert len(listed) >= 10  # the lab task: at least ten images they disagree on


def test_cached_predictions_equal_a_direct_evaluation(trained: Trained) -> None:
    """The cache holds what the model really outputs: top-5, probabilities and per-sample loss."""
    from engine.data import augment as aug
    from engine.evaluate import checkpoint_data, evaluate_checkpoint, load_classifier

    path = trained.student.checkpoints / "epoch_0001.pt"
    (pred,) = predictions.get_predictions([path], "test")
    model, state = load_classifier(path)
    data = checkpoint_data(state)
    with torch.no_grad():
        logits = model(aug.normalize(data.test.data, data.mean, data.std)).float()
    probs = logits.softmax(1)
    top = probs.topk(5, dim=1)
    assert np.array_equal(pred.labels, data.test.labels.numpy())
    assert np.array_equal(pred.top_idx, top.indices.numpy())
    np.testing.assert_allclose(pred.top_prob, top.values.numpy(), rtol=1e-4, atol=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, data.test.labels, reduction="none")
    np.testing.assert_allclose(pred.loss, loss.numpy(), rtol=1e-4, atol=1e-5)
    assert pred.accuracy == pytest.approx(evaluate_checkpoint(path, "test")["top1"])


# ---------------------------------------------------------------- caching
def test_second_diff_is_a_cache_hit(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = trained.student.checkpoints / "epoch_0001.pt", trained.student.checkpoints / "last.pt"
    first = run_diff(a, b, "val").to_json()
    calls = count_evaluations(monkeypatch)
    monkeypatch.setattr("engine.evaluate.load_classifier", lambda *a, **k: pytest.fail("loaded a model"))
    second = run_diff(a, b, "val").to_json()
    assert calls == [] and second == first
    # best.pt is a hard link to one of the epochs, epoch_0002.pt to last.pt: the cache is by content
    run_diff(trained.student.checkpoints / "best.pt", trained.student.checkpoints / "epoch_0002.pt", "val")
    assert calls == []


def test_cache_hit_from_the_command_line_never_imports_torch(trained: Trained) -> None:
    a, b = (str(trained.student.checkpoints / n) for n in ("epoch_0001.pt", "epoch_0002.pt"))
    run_diff(a, b, "test", view=True)
    probe = ("import sys, json, io, contextlib\nfrom tui.cli import app\nbuf = io.StringIO()\n"
             "with contextlib.redirect_stdout(buf):\n    try: app(sys.argv[1:])\n"
             "    except SystemExit as e: code = e.code\n"
             "print(json.dumps({'torch': 'torch' in sys.modules, 'code': code, 'out': buf.getvalue()}))")
    export = trained.root.parent / "export-probe"
    out = subprocess.run([sys.executable, "-c", probe, "diff", a, b, "--json", "--export", str(export)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False and result["code"] in (0, None)
    assert json.loads(result["out"])["n"] == 1000 and (export / "contact_sheet.png").is_file()


def test_a_changed_checkpoint_is_reevaluated(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "elsewhere" / "model.pt"  # outside any run: cached in .kdtui-predictions/ beside it
    a.parent.mkdir()
    b = trained.student.checkpoints / "epoch_0002.pt"
    shutil.copyfile(trained.student.checkpoints / "epoch_0001.pt", a)
    calls = count_evaluations(monkeypatch)
    before = run_diff(a, b, "test")
    assert (a.parent / ".kdtui-predictions").is_dir() and before.agreement < 1
    run_diff(a, b, "test")
    shutil.copyfile(b, a)  # same path, new content: now A *is* B
    after = run_diff(a, b, "test")
    assert calls[-1] == 1 and len([c for c in calls if c]) == len(calls)  # re-evaluated only the changed file
    assert after.summary()["agreement"] == 1.0 and after.disagreements().size == 0
    entries = [f for f in (a.parent / ".kdtui-predictions").glob("*-test.npz") if not f.name.startswith("view-")]
    assert len(entries) == 2  # one entry per content


def test_damaged_cache_file_is_recomputed(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = tmp_path / "a.pt"
    shutil.copyfile(trained.student.checkpoints / "epoch_0001.pt", a)
    (pred,) = predictions.get_predictions([a], "test")
    cache = predictions.cache_file(a, pred.digest, "test")
    cache.write_bytes(cache.read_bytes()[:100])
    calls = count_evaluations(monkeypatch)
    (again,) = predictions.get_predictions([a], "test")
    assert calls == [1] and np.array_equal(again.top_idx, pred.top_idx)


# ---------------------------------------------------------------- teacher vs student, references
def test_teacher_vs_student_different_archs(trained: Trained) -> None:
    code, out, err = cli("diff", trained.teacher.id, f"{trained.student.id}@last", "--runs-dir", str(trained.root),
                         "--json", "--split", "val")
    assert code == 0, err
    result = json.loads(out)
    assert result["models"]["a"]["arch"] == "wrn_16_1" and result["models"]["b"]["arch"] == "resnet8"
    assert result["a"].endswith("best.pt") and result["b"].endswith("last.pt")
    assert result["split"] == "val" and result["n"] == 30
    c = result["counts"]
    assert result["acc_a"] - result["acc_b"] == pytest.approx((c["a_right_b_wrong"] - c["a_wrong_b_right"]) / 30)
    assert len(result["disagreements"]) == c["a_right_b_wrong"] + c["a_wrong_b_right"] + c["both_wrong_different"]
    for row in result["disagreements"]:
        assert set(row) >= {"index", "label", "a_pred", "a_prob", "b_pred", "b_prob"} and row["a_pred"] != row["b_pred"]


def test_references_resolve(trained: Trained) -> None:
    run, root = trained.student, trained.root
    assert resolve_checkpoint(run.id, root) == run.checkpoints / "best.pt"
    assert resolve_checkpoint(f"{run.id[:-2]}@last", root) == run.checkpoints / "last.pt"
    assert resolve_checkpoint("student@2", root) == run.checkpoints / "epoch_0002.pt"
    assert resolve_checkpoint(str(run.checkpoints / "epoch_0001.pt"), root) == run.checkpoints / "epoch_0001.pt"
    with pytest.raises(UserError, match=r"no epoch_0009\.pt; available: 1, 2, best, last"):
        resolve_checkpoint("student@9", root)
    with pytest.raises(UserError, match="expected RUN@best"):
        resolve_checkpoint("student@first", root)


def test_text_output_and_filters(trained: Trained) -> None:
    ref_a, ref_b = f"{trained.student.id}@1", f"{trained.student.id}@2"
    code, out, _ = cli("diff", ref_a, ref_b, "--runs-dir", str(trained.root), "--limit", "3")
    assert code == 0 and "agreement" in out and "A right, B wrong" in out and "per class" in out
    whole = run_diff(trained.student.checkpoints / "epoch_0001.pt", trained.student.checkpoints / "epoch_0002.pt")
    for name in ("a_right", "b_right", "both_wrong"):
        code, out, _ = cli("diff", ref_a, ref_b, "--runs-dir", str(trained.root), "--json", "--filter", name)
        assert [r["index"] for r in json.loads(out)["disagreements"]] == whole.select(name).tolist()
    klass = whole.class_names[int(whole.a.labels[whole.disagreements()[0]])]
    code, out, _ = cli("diff", ref_a, ref_b, "--runs-dir", str(trained.root), "--json", "--class", klass,
                       "--limit", "2")
    rows = json.loads(out)["disagreements"]
    assert 1 <= len(rows) <= 2 and all(r["label"] == klass for r in rows)


# ---------------------------------------------------------------- errors: one line, exit code 2
def _variant(trained: Trained, tmp_path: Path, name: str, **changes: object) -> Path:
    state = load_checkpoint(trained.student.checkpoints / "epoch_0001.pt")
    state.pop("format"), state.pop("version")
    state.update(changes)
    save_checkpoint(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("case", ["classes", "dataset", "truncated", "foreign", "garbage", "directory", "missing",
                                  "different_val_images", "bad_split", "bad_filter", "bad_class"])
def test_errors_are_one_line_exit_2(trained: Trained, tmp_path: Path, case: str) -> None:
    from engine.models import build_model

    good = str(trained.student.checkpoints / "epoch_0001.pt")
    other, extra = good, []
    if case == "classes":
        model = build_model("resnet8", 5)
        other = str(_variant(trained, tmp_path, "five.pt", model=model.state_dict(), num_classes=5,
                             class_names=["arrow", "tee", "ell", "chevron", "fork"]))
    elif case == "dataset":
        other = str(_variant(trained, tmp_path, "cifar.pt", dataset="cifar10"))
    elif case == "truncated":
        data = Path(good).read_bytes()
        (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
        other = str(tmp_path / "cut.pt")
    elif case == "foreign":
        torch.save({"state_dict": build_model("resnet8", 10).state_dict()}, tmp_path / "foreign.pt")
        other = str(tmp_path / "foreign.pt")
    elif case == "garbage":
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
        other = str(tmp_path / "garbage.pt")
    elif case == "directory":
        (tmp_path / "dir.pt").mkdir()
        other = str(tmp_path / "dir.pt")
    elif case == "missing":
        other = "nosuchrun@last"
    elif case == "different_val_images":
        other, extra = str(_variant(trained, tmp_path, "seed.pt", recipe=load_checkpoint(good)["recipe"].replace(
            "seed = 1", "seed = 7"))), ["--split", "val"]
    else:
        extra = {"bad_split": ["--split", "holdout"], "bad_filter": ["--filter", "wrong"],
                 "bad_class": ["--class", "zebra"]}[case]
    before = {p.name for p in trained.student.predictions.glob("*")}
    code, out, err = cli("diff", good, other, "--runs-dir", str(trained.root), *extra)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtui: error: ") and out == ""
    expected = {"classes": "different num_classes", "dataset": "different dataset", "truncated": "truncated",
                "foreign": "not a kdtui checkpoint", "garbage": "not a PyTorch zip archive",
                "directory": "is a directory", "missing": "nosuchrun", "different_val_images": "different images",
                "bad_split": "--split", "bad_filter": "--filter", "bad_class": "zebra"}[case]
    assert expected in lines[0]
    if case in ("classes", "dataset"):  # refused before evaluating: no cache entry for the other file
        assert not (tmp_path / ".kdtui-predictions").exists()
    after = {p.name for p in trained.student.predictions.glob("*")}
    assert {n for n in after - before if not n.endswith(("-test.npz", "-val.npz"))} == set()  # no temp files left


# ---------------------------------------------------------------- exports
def test_export_csv_and_contact_sheet(trained: Trained, tmp_path: Path) -> None:
    ref_a, ref_b = f"{trained.student.id}@1", f"{trained.student.id}@2"
    out_dir = tmp_path / "export"
    code, _, err = cli("diff", ref_a, ref_b, "--runs-dir", str(trained.root), "--export", str(out_dir),
                         "--limit", "12", "--filter", "all")
    assert code == 0, err
    rows = list(csv.DictReader((out_dir / "disagreements.csv").open()))
    whole = run_diff(trained.student.checkpoints / "epoch_0001.pt", trained.student.checkpoints / "epoch_0002.pt")
    assert [int(r["index"]) for r in rows] == whole.disagreements()[:12].tolist()
    assert set(rows[0]) >= {"index", "label", "a_pred", "a_prob", "b_pred", "b_prob"}
    with Image.open(out_dir / "contact_sheet.png") as sheet:
        sheet.load()
        # 12 tiles of 32 px upscaled x4 = 128 px, 8 per row, 3 caption lines of 12 px, 4 px gaps
        assert sheet.size == (8 * 128 + 9 * 4, 2 * (128 + 36 + 4) + 3 * 4) == sheet_geometry(12, 32)[2:]
        assert sheet.mode == "RGB"
        tile = np.asarray(sheet)[4:132, 4:132]
        first = whole.disagreements()[0]
        from engine.evaluate import checkpoint_data

        image = checkpoint_data(whole.a.meta).test.images(torch.tensor([first]))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(tile[::4, ::4], image)  # the right image, upscaled by pixel repetition
