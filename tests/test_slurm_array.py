"""`kdtui slurm`: one job array per sweep, run end to end through a fake sbatch/scancel (tests/fake_slurm.py).

The fake reads the script's #SBATCH directives and runs its array tasks as local processes
(respecting --array and %N, with SLURM_ARRAY_* set), so the whole path runs in CI: the
launcher's queued run directories, the task picking its run from SLURM_ARRAY_TASK_ID, the
task steps around the engine (on CPU), the job ids in run.json, `kdtui stop` -> scancel
JOBID_TASK, and resubmission resuming from last.pt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.rundir import RunDir, iter_run_dirs
from tests import fake_slurm
from tests.test_launcher import invoke, wait_for
from tui.store import RunStore

RECIPE = """
[run]
name = "arr"
method = "supervised"

[data]
dataset = "embedded"
batch_size = 8
eval_batch_size = 64
embedded_per_class = 4
image_size = 16

[model]
arch = "resnet8"

[train]
epochs = 1
max_steps_per_epoch = 2
threads = 1

[checkpoint]
every = 1
"""
SWEEP4 = RECIPE + '\n[sweep]\n"optim.lr" = [0.1, 0.2, 0.3, 0.4]\n'
CPU = ["--set", "train.device=cpu"]


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runs root whose path has a blank and a quote (as shared filesystems' mount points may)."""
    root = tmp_path / "shared fs" / "it's runs"
    monkeypatch.setenv("KDTUI_RUNS_DIR", str(root))
    return root


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Fake sbatch and scancel first on PATH; yields their state folder; kills leftovers after."""
    state = tmp_path / "slurm-state"
    fake_slurm.install(tmp_path / "bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    yield state
    fake_slurm.kill_everything(state)


def recipe_file(tmp_path: Path, text: str, name: str = "arr.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def by_index(root: Path) -> list[RunDir]:
    return sorted(iter_run_dirs(root), key=lambda run: run.read_info()["slurm_array_index"])


def statuses(runs: list[RunDir]) -> list[str]:
    return [run.read_info().get("status") for run in runs]


def listed(root: Path) -> dict[str, dict]:
    code, out, err = invoke("runs", "--json", "--runs-dir", str(root))
    assert code == 0, err
    return {doc["id"]: doc for doc in json.loads(out)}


def test_one_array_script_for_the_sweep(tmp_path: Path, shared: Path) -> None:
    code, out, err = invoke("slurm", str(recipe_file(tmp_path, SWEEP4)), "--max-parallel", "2")
    assert code == 0, err
    script = Path(out.strip().splitlines()[-1])
    assert script.parent.parent == shared.resolve() / "slurm" and script.name == "job.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --gpus-per-node=1" in text  # cuda: the cluster default
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    runs = by_index(shared)
    assert [run.read_info()["sweep_point"]["optim.lr"] for run in runs] == [0.1, 0.2, 0.3, 0.4]
    assert all('device = "cuda"' in run.recipe_path.read_text() for run in runs)
    assert [line.split()[:3] for line in out.splitlines()[:4]] == [["task", str(i), r.id] for i, r in enumerate(runs)]
    docs = listed(shared)  # the whole sweep is visible before anything runs
    assert {docs[r.id]["status"] for r in runs} == {"queued"} and len(docs) == 4
    # the bash array, as bash reads it, names exactly the run directories, in task order
    block = re.search(r"^runs=\(\n.*?^\)$", text, re.S | re.M)
    assert block is not None
    printed = subprocess.run(["bash", "-c", block[0] + '\nprintf "%s\\0" "${runs[@]}"'], capture_output=True,
                             check=True).stdout.decode().split("\0")[:-1]
    assert printed == [str(run.path.resolve()) for run in runs]
    # a task id outside the array: one line, exit 2, nothing touched
    before = [run.info_path.read_bytes() for run in runs]
    bad = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "4"}, capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "expected an array task 0..3" in bad.stderr
    assert [run.info_path.read_bytes() for run in runs] == before


def test_without_a_sweep_one_task_and_a_cpu_override(tmp_path: Path, shared: Path) -> None:
    code, out, err = invoke("slurm", str(recipe_file(tmp_path, RECIPE)), *CPU, "--nodes", "2", "--gpus-per-node", "3")
    assert code == 0, err
    text = Path(out.strip().splitlines()[-1]).read_text()
    assert "#SBATCH --array=0-0" in text and "--gpus-per-node" not in text.split("set -euo")[0]
    assert "srun --kill-on-bad-exit=1" in text and "--nproc-per-node 3" in text and '"$head_node:$port"' in text
    (run,) = iter_run_dirs(shared)
    info = run.read_info()
    assert 'device = "cpu"' in run.recipe_path.read_text() and info["device"] == "2xcpu*3"
    assert info["launch"]["scheduler"] == "slurm" and info["slurm_array_index"] == 0


@pytest.mark.parametrize("args", [["--max-parallel", "0"], ["--set", "train.device=mps"], ["--cpus-per-node", "0"]])
def test_bad_options_create_nothing(tmp_path: Path, shared: Path, args: list[str]) -> None:
    code, _, err = invoke("slurm", str(recipe_file(tmp_path, SWEEP4)), *args)
    assert code == 2 and err.startswith("kdtui: error: ") and err.count("\n") == 1, err
    assert not shared.exists() or not any(shared.iterdir())


def test_sbatch_failure_leaves_runs_interrupted_not_queued(tmp_path: Path, shared: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "failbin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\n"
                                    "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, _, err = invoke("slurm", str(recipe_file(tmp_path, SWEEP4)), "--submit")
    assert code == 2 and "Invalid account" in err and err.count("\n") == 1, err
    docs = listed(shared)
    assert len(docs) == 4 and {d["status"] for d in docs.values()} == {"interrupted"}
    assert all("sbatch" in d["error"] and "job.sbatch" in d["error"] for d in docs.values())


def test_sweep_runs_as_one_array_through_fake_sbatch(tmp_path: Path, shared: Path, slurm: Path) -> None:
    code, out, err = invoke("slurm", str(recipe_file(tmp_path, SWEEP4)), *CPU, "--max-parallel", "2", "--submit")
    assert code == 0, err
    job = re.search(r"submitted job array (\d+) \(4 tasks, at most 2 at once\)", out)
    assert job is not None, out
    job_id = job[1]
    runs = by_index(shared)
    assert [run.read_info()["slurm_job"] for run in runs] == [f"{job_id}_{i}" for i in range(4)]
    assert all(f"  {job_id}_{i}  {run.id}" in out for i, run in enumerate(runs))
    (call,) = fake_slurm.calls(slurm, "sbatch")
    assert call[0] == "--parsable" and call[-1] == str(runs[0].read_info()["slurm_script"])
    assert set(statuses(runs)) <= {"queued", "running", "finished"}

    wait_for(lambda: fake_slurm.jobs_done(slurm), 240, "the array's tasks")
    assert statuses(runs) == ["finished"] * 4, [run.log_path.read_text()[-800:] for run in runs]
    info = fake_slurm.job_info(slurm, job_id)
    assert info["tasks"] == [0, 1, 2, 3] and info["throttle"] == 2 and 1 <= info["max_running"] <= 2
    raw = {doc["id"]: doc for doc in RunStore(shared).all()}  # written by the tasks' end steps, before any sync
    assert {raw[run.id]["status"] for run in runs} == {"finished"}
    docs = listed(shared)
    assert [docs[run.id]["status"] for run in runs] == ["finished"] * 4
    assert [docs[run.id]["slurm_job"] for run in runs] == [f"{job_id}_{i}" for i in range(4)]
    for i, run in enumerate(runs):
        log = run.log_path.read_text()
        assert f"array task {job_id}_{i} on " in log and f"array task {job_id}_{i} ended: finished" in log
        assert run.read_info()["slurm_array_job"] == job_id and run.read_info()["epoch"] == 1


def test_stop_queued_and_running_tasks_then_resubmit(tmp_path: Path, shared: Path, slurm: Path) -> None:
    text = RECIPE.replace("epochs = 1", "epochs = 3") + '\n[sweep]\n"optim.lr" = [0.1, 0.2]\n'
    code, out, err = invoke("slurm", str(recipe_file(tmp_path, text)), *CPU, "--max-parallel", "1", "--submit")
    assert code == 0, err
    job_id = re.search(r"submitted job array (\d+)", out)[1]  # type: ignore[index]
    first, second = runs = by_index(shared)
    script = Path(first.read_info()["slurm_script"])

    wait_for(lambda: first.read_info().get("status") == "running", 180, "task 0 to start training")
    engine = int(first.read_info()["pid"])
    os.kill(engine, signal.SIGSTOP)  # hold it mid-run, so the test does not race the tiny training
    assert first.read_info()["status"] == "running" and second.read_info()["status"] == "queued"  # %1: waiting

    code, out, err = invoke("stop", second.id)  # pending in SLURM: cancelled, never runs
    assert code == 0 and "cancelled array task" in out, err
    assert fake_slurm.calls(slurm, "scancel") == [[f"{job_id}_1"]]
    assert second.read_info()["status"] == "interrupted" and f"sbatch --array=1 {script}" in out

    code, out, err = invoke("stop", first.id)  # running: scancel -> SIGCONT + SIGTERM -> checkpoint
    assert code == 0 and f"scancel {job_id}_0" in out, err
    assert fake_slurm.calls(slurm, "scancel")[-1] == [f"{job_id}_0"]
    wait_for(lambda: fake_slurm.jobs_done(slurm) and first.read_info().get("status") == "interrupted", 120,
             "the stopped task to checkpoint")
    assert (first.checkpoints / "last.pt").exists() and not (slurm / job_id / "1.pid").exists()
    stopped_at = first.read_info()["step"]
    assert listed(shared)[first.id]["status"] == "interrupted"

    code, _, err = invoke("resume", first.id)  # points at the resubmission
    assert code == 2 and f"sbatch --array=0 {script}" in err

    again = subprocess.run(["sbatch", "--parsable", "--array=0", str(script)], capture_output=True, text=True,
                           check=True, cwd=tmp_path).stdout.strip()  # (slurm-%A_%a.out lands in the cwd)
    wait_for(lambda: fake_slurm.jobs_done(slurm), 240, "the resubmitted task")
    assert statuses(runs) == ["finished", "interrupted"], first.log_path.read_text()[-800:]
    assert "(resuming from last.pt)" in first.log_path.read_text() and first.read_info()["slurm_job"] == f"{again}_0"
    steps = [e["step"] for e in first.events() if e.get("split") == "train" and e.get("kind") == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and stopped_at < 6  # continued, not restarted
    assert not second.log_path.exists() or "array task" not in second.log_path.read_text()  # never ran

    subprocess.run(["sbatch", "--array=0", str(script)], capture_output=True, check=True, cwd=tmp_path)
    wait_for(lambda: fake_slurm.jobs_done(slurm), 60, "the skipping task")  # finished: skipped, not retrained
    assert first.read_info()["status"] == "finished" and "skips it" in first.log_path.read_text()


def slurm_run(root: Path, status: str) -> RunDir:
    """A submitted array task as run.json records it (nothing runs)."""
    from engine.rundir import create_run_dir

    return create_run_dir(root, "t", RECIPE, {"status": status, "host": "node7", "slurm_job": "999_2",
                                               "slurm_array_index": 2,
                                               "slurm_script": "/x/job.sbatch", "launch": {"scheduler": "slurm"}})


def test_stop_errors_are_one_line(shared: Path, slurm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = slurm_run(shared, "running")
    code, _, err = invoke("stop", running.id)  # the fake knows no job 999
    assert code == 2 and "scancel 999_2 failed (exit 1): scancel: error: Kill job error" in err, err
    assert err.count("\n") == 1 and running.read_info()["status"] == "running"
    assert invoke("stop", slurm_run(shared, "finished").id)[2].startswith("kdtui: error: ")
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = invoke("stop", running.id)
    assert code == 2 and "scancel not found on PATH" in err and "scancel 999_2" in err, err


@pytest.mark.slow
def test_a_multi_process_point_runs_torchrun_inside_its_task(tmp_path: Path, shared: Path, slurm: Path) -> None:
    port = str(20000 + os.getpid() % 20000)
    code, _, err = invoke("slurm", str(recipe_file(tmp_path, RECIPE)), *CPU, "--gpus-per-node", "2", "--port", port,
                            "--submit")
    assert code == 0, err
    (run,) = iter_run_dirs(shared)
    wait_for(lambda: fake_slurm.jobs_done(slurm), 240, "the torchrun task")
    info = run.read_info()
    assert info["status"] == "finished" and info["processes"] == 2, run.log_path.read_text()[-1500:]
    assert info["device"] == "cpu*2" and listed(shared)[run.id]["status"] == "finished"
