"""Every method of the distillation zoo end to end through `kdtui run` (launcher + engine processes),
then `kdtui runs`, `kdtui diff` and the TUI's runs table see the runs like any other."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from engine.checkpoint import load_checkpoint
from engine.recipe_distill import INIT_PHASE_METHODS, ZOO_METHODS
from engine.rundir import iter_run_dirs
from tests.conftest import ROOT, kdtui_cli, write_recipe
from tests.test_distill import fake_checkpoint
from tests.tui_fake import wait_for
from tui.app import KdtuiApp
from tui.widgets.runs_table import RunsTable

WITH_MODULES = {"fitnet", "cc", "vid", "ab", "ft", "crd"}  # methods that own trainable modules

SWEEP = """
[run]
name = "zoo"
method = "{first}"
[data]
dataset = "embedded"
batch_size = 16
eval_batch_size = 256
val_fraction = 0.2
embedded_per_class = 8
image_size = 16
[model]
arch = "resnet8"
[teacher]
checkpoint = "{teacher}"
[distill]
{init}
[distill.crd]
nce_k = 32
[train]
epochs = 1
seed = 0
threads = 1
max_steps_per_epoch = 2
[sweep]
"run.method" = {methods}
"""


def test_every_zoo_method_runs_and_shows_up_like_any_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    teacher = fake_checkpoint(tmp_path / "teacher.pt", "resnet14")
    staged = [m for m in ZOO_METHODS if m in INIT_PHASE_METHODS]  # a 1-epoch initialisation stage, then 1 epoch
    for methods, init in ((staged, "init_epochs = 1"), ([m for m in ZOO_METHODS if m not in staged], "")):
        text = SWEEP.format(teacher=teacher, methods=json.dumps(methods), init=init, first=methods[0])
        done = kdtui_cli("run", str(write_recipe(tmp_path, text, "zoo.toml")), runs=runs)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    by_method = {r.read_info()["method"]: r for r in iter_run_dirs(runs)}
    assert set(by_method) == set(ZOO_METHODS)
    for method, run in by_method.items():
        info = run.read_info()
        assert info["status"] == "finished", (method, info.get("error"))
        events = run.events()
        phases = {e.get("phase") for e in events if e["split"] == "train"}
        assert phases == ({"init", "train"} if method in INIT_PHASE_METHODS else {None}), method
        assert any(e["split"] == "test" and 0 <= e["top1"] <= 1 for e in events), method
        saved = load_checkpoint(run.checkpoints / "last.pt")
        assert saved["arch"] == "resnet8" and saved["method"] == method
        assert ("distill" in saved["modules"]) == (method in WITH_MODULES), method

    listed = kdtui_cli("runs", "--json", runs=runs)
    assert listed.returncode == 0, listed.stderr
    assert sorted(doc["method"] for doc in json.loads(listed.stdout)) == sorted(ZOO_METHODS)

    a, b = by_method["crd"], by_method["dkd"]
    compared = kdtui_cli("diff", str(a.checkpoints / "last.pt"), str(b.checkpoints / "last.pt"), "--json", runs=runs)
    assert compared.returncode == 0, compared.stderr
    result = json.loads(compared.stdout)
    assert result["n"] == 1000 and 0 <= result["agreement"] <= 1

    shown = _runs_in_tui(runs)
    assert sorted(doc["method"] for doc in shown) == sorted(ZOO_METHODS)


def _runs_in_tui(runs: Path) -> list[dict]:
    async def table() -> list[dict]:
        app = KdtuiApp(runs, ROOT / "recipes")
        async with app.run_test(size=(140, 40)) as pilot:
            await wait_for(pilot, lambda: app.runs_screen is not None and app.runs_screen.loaded
                           and len(app.screen.query_one(RunsTable).rows) == len(ZOO_METHODS), timeout=60)
            return list(app.screen.query_one(RunsTable).rows)

    return asyncio.run(table())
