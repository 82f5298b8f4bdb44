"""Hostile checkpoints: pickles that run code on load, truncated files, other programs' files.

Every path that opens a checkpoint goes through engine.checkpoint.load_checkpoint
(torch.load with weights_only=True): `kdtui eval`, `kdtui diff`, the engine resuming from
last.pt and the engine loading a teacher. A crafted pickle must be refused everywhere without
its code running (the exploit touches a marker file; the test first proves that an unsafe load
does touch it), and any other bad file must give one clear line and exit code 2.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from engine.data.embedded import CLASS_NAMES
from engine.errors import CheckpointError
from engine.models import build_model
from engine.recipe import load_recipe
from tests.conftest import TINY_RECIPE
from tests.reliability.procs import new_run, run_cli


class Exploit:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A valid kdtui checkpoint, and the crafted ones (all exploits touch the same marker)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    weights = build_model("resnet8", 10).state_dict()
    good = {"model": weights, "arch": "resnet8", "num_classes": 10, "dataset": "embedded",
            "class_names": list(CLASS_NAMES), "recipe": load_recipe(recipe).to_toml(), "method": "supervised",
            "progress": {"epoch": 1, "step": 4}}
    out = {"good": folder / "good.pt", "marker": folder / "PWNED"}
    save_checkpoint(good, out["good"])
    exploit = Exploit(f"touch {out['marker']}")
    evil = {"format": FORMAT, "version": 1, **good, "extra": {"hook": exploit}}
    torch.save(evil, out.setdefault("evil-zip", folder / "evil-zip.pt"))
    torch.save(evil, out.setdefault("evil-legacy", folder / "evil-legacy.pt"), _use_new_zipfile_serialization=False)
    out.setdefault("evil-pickle", folder / "evil-pickle.pt").write_bytes(pickle.dumps(exploit, protocol=2))
    torch.save({"format": FORMAT, "model": exploit}, out.setdefault("evil-model", folder / "evil-model.pt"))
    return out


EVIL = ["evil-zip", "evil-legacy", "evil-pickle", "evil-model"]


def cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from tui.cli import app

    return CliRunner().invoke(app, list(args))


def assert_refused(result: Any, *needles: str) -> None:
    """Exit 2 with exactly one line on stderr, naming what was asked for."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("kdtui: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(needle in result.stderr for needle in needles), result.stderr


def test_the_exploit_is_real(files: dict[str, Path], tmp_path: Path) -> None:
    """Control: loaded without weights_only, the crafted file does run its code."""
    other = tmp_path / "control-marker"
    path = tmp_path / "control.pt"
    torch.save({"x": Exploit(f"touch {other}")}, path)
    torch.load(path, weights_only=False)
    assert other.exists()


@pytest.mark.parametrize("name", EVIL)
def test_crafted_pickle_is_refused_everywhere(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    evil, good, marker = files[name], files["good"], files["marker"]
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(evil)
    assert "\n" not in str(caught.value) and str(evil) in str(caught.value)
    # zip archives reach torch.load(weights_only=True), which refuses the pickled call; the legacy
    # formats are not even unpickled (not a zip archive)
    assert ("refused to load" if name in ("evil-zip", "evil-model") else "not a kdtui checkpoint") in str(caught.value)
    assert_refused(cli("eval", str(evil)), str(evil))
    assert_refused(cli("diff", str(evil), str(good)), str(evil))
    assert_refused(cli("diff", str(good), str(evil)), str(evil))
    assert not marker.exists()


def test_engine_refuses_a_crafted_last_pt_and_teacher(files: dict[str, Path], tmp_path: Path) -> None:
    """Resuming from a crafted last.pt, or distilling from a crafted teacher: the run fails, no code runs."""
    from engine.__main__ import main as engine_main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.replace("embedded_per_class = 16", "embedded_per_class = 4"))
    runs = tmp_path / "runs"
    resumed = new_run(recipe, runs)
    resumed.checkpoints.mkdir()
    (resumed.checkpoints / "last.pt").write_bytes(files["evil-zip"].read_bytes())
    assert engine_main([str(resumed.path), "--resume"]) == 2
    info = resumed.read_info()
    assert info["status"] == "failed" and "refused to load" in info["error"] and "last.pt" in info["error"]

    kd = tmp_path / "kd.toml"
    kd.write_text(recipe.read_text().replace('method = "supervised"', 'method = "kd"')
                  + f'\n[teacher]\ncheckpoint = "{files["evil-model"]}"\n')
    student = new_run(kd, runs)
    assert engine_main([str(student.path)]) == 2
    info = student.read_info()
    assert info["status"] == "failed" and "refused to load" in info["error"], info["error"]
    assert not files["marker"].exists()


def test_real_cli_refuses_a_crafted_pickle(files: dict[str, Path]) -> None:
    result = run_cli("eval", str(files["evil-zip"]))
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "refused to load" in result.stderr and "Traceback" not in result.stderr
    assert not files["marker"].exists()


def foreign_files(good: Path, folder: Path) -> dict[str, Path]:
    """Files that are not kdtui checkpoints, or are damaged ones."""
    weights = load_checkpoint(good)["model"]
    made: dict[str, Path] = {}

    def put(name: str, data: bytes | None = None, obj: Any = None) -> None:
        made[name] = folder / f"{name}.pt"
        if obj is not None:
            torch.save(obj, made[name])
        else:
            made[name].write_bytes(data or b"")

    raw = good.read_bytes()
    for cut in (0, 1, 30, 100, len(raw) // 3, len(raw) // 2, len(raw) - 22, len(raw) - 1):
        put(f"truncated-{cut}", raw[:cut])
    put("plain-state-dict", obj=weights)
    put("other-program", obj={"state_dict": weights, "epoch": 3, "optimizer": {}})
    put("a-tensor", obj=torch.zeros(3))
    put("random-bytes", np.random.default_rng(0).bytes(4096))
    put("a-recipe", TINY_RECIPE.encode())
    junk = io.BytesIO()
    with zipfile.ZipFile(junk, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02junk")
        archive.writestr("archive/version", b"3\n")
    put("zip-of-junk", junk.getvalue())
    npz = io.BytesIO()
    np.savez(npz, a=np.zeros(3))
    put("an-npz", npz.getvalue())
    state = load_checkpoint(good)
    for field, value in (("num_classes", "ten"), ("recipe", "[[[ not toml"), ("recipe", "x = " + "[" * 3000),
                         ("model", [1, 2]), ("progress", "x"), ("class_names", 5), ("arch", "../../etc"),
                         ("num_classes", 10**12), ("model", {"conv1.weight": torch.zeros(1)})):
        put(f"damaged-{field}-{str(value)[:8]}".replace("/", "_").replace("[", "("), obj={**state, field: value})
    made["a-directory"] = folder / "dir.pt"
    made["a-directory"].mkdir()
    made["missing"] = folder / "missing.pt"
    return made


def test_truncated_and_foreign_files_are_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    for name, path in foreign_files(files["good"], tmp_path).items():
        if not name.startswith("damaged-"):  # damaged ones load; their readers refuse them below
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(path)
            assert "\n" not in str(caught.value) and str(path) in str(caught.value), name
        assert_refused(cli("eval", str(path)))
        assert_refused(cli("diff", str(path), str(files["good"])))


def test_crafted_predictions_cache_is_not_unpickled(files: dict[str, Path], tmp_path: Path) -> None:
    """The diff's cache (numpy, allow_pickle=False): an object array planted there is ignored, not run."""
    from engine.diff import run_diff
    from engine.predictions import cache_file, file_digest

    good = tmp_path / "good.pt"
    good.write_bytes(files["good"].read_bytes())
    planted = cache_file(good, file_digest(good), "test")
    planted.parent.mkdir(parents=True)
    marker = tmp_path / "PWNED-cache"
    with open(planted, "wb") as handle:
        np.savez(handle, header=np.array([Exploit(f"touch {marker}")], dtype=object), labels=np.zeros(3))
    result = run_diff(good, good, "test")
    assert result.summary()["n"] == 1000 and not marker.exists()


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_damaged_bytes_load_or_fail_in_one_line(files: dict[str, Path], tmp_path: Path, data: st.DataObject) -> None:
    """Bytes flipped, cut or inserted anywhere: a state dict comes back or a one-line CheckpointError."""
    raw = bytearray(files["good"].read_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="kind")
        if kind == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[at: at + data.draw(st.integers(1, 4096))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path / "fuzz.pt"
    path.write_bytes(bytes(raw))
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(err).startswith(f"{path}: ")
    else:
        assert state["format"] == FORMAT and isinstance(state["model"], dict)
    assert not files["marker"].exists()
