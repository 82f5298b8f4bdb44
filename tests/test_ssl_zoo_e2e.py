"""The self- and semi-supervised zoo through the command line, as a user runs it: one `kdtui run` of a
sweep over every SSL method (their default heads) on two CPU lanes at once, one FixMatch run, a `kdtui run` of
linear_eval on a BYOL checkpoint, then `kdtui runs --json` lists all of them as finished."""

from __future__ import annotations

import json
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.rundir import iter_run_dirs
from tests.conftest import kdtui_cli, write_recipe

SSL_METHODS = ["byol", "simsiam", "moco", "barlow_twins", "vicreg", "dino"]

COMMON = """
[data]
dataset = "embedded"
embedded_per_class = 8
image_size = 16
val_fraction = 0.25
batch_size = 16
eval_batch_size = 500
[model]
arch = "resnet8"
[train]
epochs = 1
max_steps_per_epoch = 2
threads = 1
"""
SWEEP = f'[run]\nname = "zoo"\nmethod = "byol"\n{COMMON}[sweep]\n"run.method" = {json.dumps(SSL_METHODS)}\n'
FIXMATCH = f'[run]\nname = "fm"\nmethod = "fixmatch"\n{COMMON}[semi]\nnum_labels = 20\nmu = 2\n'


def test_every_ssl_method_and_fixmatch_run_through_kdtui_run_and_feed_linear_eval(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name, text, devices in (("zoo.toml", SWEEP, ["-d", "cpu", "-d", "cpu"]), ("fm.toml", FIXMATCH, [])):
        done = kdtui_cli("run", str(write_recipe(tmp_path, text, name)), *devices, runs=runs)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    by_method = {r.read_info()["method"]: r for r in iter_run_dirs(runs)}
    assert set(by_method) == {*SSL_METHODS, "fixmatch"}
    for method, run in by_method.items():
        assert run.read_info()["status"] == "finished", (method, run.read_info().get("error"))
        val = [e for e in run.events() if e["split"] == "val"][-1]
        assert 0 <= val["knn_top1" if method != "fixmatch" else "top1"] <= 1, method

    byol = by_method["byol"].checkpoints / "last.pt"
    linear = f'[run]\nname = "lin"\nmethod = "linear_eval"\n{COMMON}[teacher]\ncheckpoint = "{byol}"\n'
    done = kdtui_cli("run", str(write_recipe(tmp_path, linear, "lin.toml")), runs=runs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lin = next(r for r in iter_run_dirs(runs) if r.read_info()["method"] == "linear_eval")
    assert any(e["split"] == "test" and 0 <= e["top1"] <= 1 for e in lin.events())
    head = {k for k in load_checkpoint(lin.checkpoints / "last.pt")["model"]}
    assert any(k.startswith("fc") for k in head)  # a class head: `kdtui eval` and diff take it

    listed = kdtui_cli("runs", "--json", runs=runs)
    assert listed.returncode == 0, listed.stderr
    docs = json.loads(listed.stdout)
    assert sorted(d["method"] for d in docs) == sorted([*SSL_METHODS, "fixmatch", "linear_eval"])
    assert {d["status"] for d in docs} == {"finished"}
