"""`kdtui runs/show/stop/relaunch/tag/note/rm/tensorboard/slurm/bench`: outputs, edits and bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.rundir import RunDir, create_run_dir, iter_run_dirs
from tests.conftest import TINY_RECIPE
from tests.test_launcher import invoke, wait_for
from tui.commands.bench import add_ratios, format_table, throughput
from tui.commands.runs import tensorboard_command
from tui.queue import wait_supervisor
from tui.store import RunStore

JSON_FIELDS = {"id", "name", "status", "method", "device", "pid", "run_dir", "epoch", "best", "created", "started",
               "ended"}


def fake_run(root: Path, name: str, status: str, top1: float | None = None, **info: object) -> RunDir:
    best = {"val.top1": top1, "epoch": 2, "metric": "val.top1"} if top1 is not None else {}
    return create_run_dir(root, name, TINY_RECIPE, {"method": "supervised", "arch": "resnet8", "device": "cpu",
                                                    "epochs": 3, "status": status, "best": best, **info})


@pytest.fixture
def history(runs_dir: Path) -> list[RunDir]:
    return [fake_run(runs_dir, "alpha", "finished", 0.61), fake_run(runs_dir, "beta", "finished", 0.72),
            fake_run(runs_dir, "gamma", "failed", error="loss became nan")]


def test_runs_json_filters_sorts_and_csv(history: list[RunDir]) -> None:
    code, out, _ = invoke("runs", "--json")
    docs = json.loads(out)
    assert code == 0 and isinstance(docs, list) and len(docs) == 3
    assert all(doc.keys() >= JSON_FIELDS for doc in docs)
    code, out, _ = invoke("runs", "--json", "--status", "finished", "--sort", "val.top1")
    assert [d["name"] for d in json.loads(out)] == ["beta", "alpha"]
    code, out, _ = invoke("runs", "--json", "--sort", "val.top1", "--asc")
    assert [d["name"] for d in json.loads(out)] == ["alpha", "beta", "gamma"]  # no value: last
    code, out, _ = invoke("runs", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 3 and {"id", "status", "best.val.top1", "params.optim.lr"} <= rows[0].keys()
    code, out, _ = invoke("runs")
    assert code == 0 and "val.top1=0.7200" in out and out.splitlines()[0].split()[:2] == ["ID", "STATUS"]


def test_csv_cells_never_run_as_spreadsheet_formulas(history: list[RunDir]) -> None:
    assert invoke("note", "alpha", '=HYPERLINK("http://x","y")')[0] == 0
    assert invoke("tag", "alpha", "@risk")[0] == 0
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(invoke("runs", "--csv")[1]))}
    assert rows["alpha"]["note"] == '\'=HYPERLINK("http://x","y")' and rows["alpha"]["tags"] == "'@risk"
    assert rows["alpha"]["best.val.top1"] == "0.61" and rows["gamma"]["error"] == "loss became nan"


def test_show_tag_note_and_rm(history: list[RunDir], runs_dir: Path) -> None:
    alpha = history[0]
    code, out, _ = invoke("show", "alpha", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["id"] == alpha.id and doc["best"]["val.top1"] == 0.61
    assert invoke("tag", alpha.id[:-2], "baseline")[0] == 0
    assert invoke("note", "alpha", "first try")[0] == 0
    code, out, _ = invoke("runs", "--json", "--tag", "baseline")
    (tagged,) = json.loads(out)
    assert tagged["id"] == alpha.id and tagged["note"] == "first try" and tagged["tags"] == ["baseline"]
    assert invoke("runs", "--rebuild", "--json")[0] == 0  # tags and notes live in the run dir: rebuild keeps them
    assert RunStore(runs_dir).get(alpha.id)["tags"] == ["baseline"]
    assert invoke("tag", "alpha", "baseline", "--remove")[0] == 0
    assert RunStore(runs_dir).get(alpha.id)["tags"] == []
    code, out, _ = invoke("rm", "beta", "--keep-files")
    assert code == 0 and (runs_dir / "removed" / history[1].id / "run.json").exists()
    code, _, _ = invoke("rm", "gamma")
    assert code == 0 and not history[2].path.exists()
    code, out, _ = invoke("runs", "--json")
    assert [d["name"] for d in json.loads(out)] == ["alpha"]  # removed runs do not come back on sync


STUB = """
import json, os, signal, sys, time
from pathlib import Path
from engine.rundir import RunDir
run = RunDir(Path(sys.argv[1]))
def stop(signum, frame):
    run.update_info(status="interrupted", ended=time.time(), error=None)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
run.update_info(status="running", pid=os.getpid())
time.sleep(60)
"""


def test_stop_signals_the_process_group_and_refuses_rm(runs_dir: Path) -> None:
    from tui.launcher import engine_env

    run = fake_run(runs_dir, "long", "queued", host=socket.gethostname())
    child = subprocess.Popen([sys.executable, "-c", STUB, str(run.path)], env=engine_env(), start_new_session=True)
    wait_for(lambda: run.read_info()["status"] == "running", 60, "the stub to start")
    code, _, err = invoke("rm", "long")
    assert code == 2 and "kdtui stop" in err and run.path.exists()
    code, out, _ = invoke("stop", "long")
    assert code == 0 and "SIGTERM" in out
    assert child.wait(30) == 130
    assert run.read_info()["status"] == "interrupted"
    queued = fake_run(runs_dir, "later", "queued")
    assert invoke("stop", "later")[0] == 0 and queued.read_info()["status"] == "interrupted"


def test_relaunch_makes_a_new_run_with_edits(history: list[RunDir], runs_dir: Path) -> None:
    first = history[0]
    code, out, err = invoke("relaunch", first.id, "--set", "optim.lr=0.5", "--set", "train.seed=7", "--detach")
    assert code == 0, out + err
    (second,) = [r for r in iter_run_dirs(runs_dir) if r.id not in {h.id for h in history}]
    assert invoke("stop", second.id)[0] == 0  # no need to train it
    queue_pid = int(out.split("queue: pid ")[1].split()[0])
    wait_for(lambda: wait_supervisor(queue_pid, 0.1), 60, "the queue to stop")
    info = second.read_info()
    resolved = tomllib.loads(second.recipe_path.read_text())
    original = tomllib.loads(first.recipe_path.read_text())
    assert resolved["optim"]["lr"] == 0.5 and resolved["train"]["seed"] == 7
    assert resolved["model"]["arch"] == original["model"]["arch"] == "resnet8"
    assert resolved["data"]["batch_size"] == original["data"]["batch_size"]
    assert info["parent"] == first.id and info["device"] == "cpu"
    assert RunStore(runs_dir).get(second.id)["parent"] == first.id


@pytest.mark.parametrize("args", [
    ["show", "nosuchrun"],
    ["show", "2"],  # an ambiguous prefix: lists the candidates
    ["stop", "nosuchrun"],
    ["resume", "nosuchrun"],
    ["tag", "nosuchrun", "x"],
    ["note", "nosuchrun", "x"],
    ["rm", "nosuchrun"],
    ["relaunch", "nosuchrun"],
    ["relaunch", "alpha", "--set", "optim.lr"],
    ["relaunch", "alpha", "--device", "cuda:9"],
    ["tensorboard", "nosuchrun"],
    ["runs", "--status", "done"],
    ["run", "RECIPE", "--device", "cuda:9"],
    ["run", "RECIPE", "--device", "gpu0"],
    ["run", "RECIPE", "--set", "optim.lr"],
    ["run", "RECIPE", "--set", "optim.nosuch=1"],
    ["run", "RECIPE", "--per-device", "0"],
    ["run", "RECIPE", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"],
    ["run", "RECIPE", "--nnodes", "2", "--rdzv-endpoint", "nohostport"],
    ["bench", "devices", "RECIPE", "--device", "cuda:9"],
    ["slurm", "RECIPE", "--nodes", "0"],
    ["slurm", "RECIPE", "--submit"],
])
def test_bad_input_is_one_line_exit_2(args: list[str], history: list[RunDir], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch, no nvidia-smi
    before = sorted(p.name for p in history[0].path.parent.iterdir())
    code, out, err = invoke(*[str(recipe) if a == "RECIPE" else a for a in args])
    assert code == 2, (out, err)
    assert err.startswith("kdtui: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    if args[:2] == ["show", "2"]:
        assert "ambiguous" in err and all(r.id in err for r in history)
    if args[0] in ("run", "slurm", "bench"):
        assert sorted(p.name for p in history[0].path.parent.iterdir()) == before  # nothing created


def test_slurm_script(runs_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    code, out, err = invoke("slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                            "--time", "12:00:00", "--port", "29600")
    assert code == 0, err
    script = Path(out.strip().splitlines()[-1])
    (run,) = iter_run_dirs(runs_dir)
    assert str(script) == run.read_info()["slurm_script"] and script.name == "job.sbatch"  # one array per sweep
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", "#SBATCH --array=0-0",
                 f"#SBATCH --output={script.parent}/task-%A_%a.out", f"    {run.path.resolve()}"):
        assert line in text
    assert "srun --kill-on-bad-exit=1" in text and "--nproc-per-node 4" in text and '"$head_node:$port"' in text
    assert "port=$(( (29600 - 1024 + task)" in text  # a rendezvous port per array task
    assert '-m engine "$run_dir"' in text and "--rdzv-backend c10d" in text
    assert tomllib.loads(run.recipe_path.read_text())["train"]["device"] == "cuda"  # rank r -> cuda:LOCAL_RANK
    assert run.read_info()["status"] == "queued" and RunStore(runs_dir).get(run.id)["device"] == "2xcuda:0,1,2,3"
    directives = [i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert max(directives) < first_command  # sbatch ignores directives after the first command


def test_bench_arithmetic() -> None:
    events = [{"split": "train", "kind": "step", "step": 5 * i, "time": 100.0 + 0.5 * i} for i in range(1, 6)]
    cpu = {"device": "cpu", "processes": 1, **throughput(events, 64, 100)}
    assert cpu["timed_steps"] == 20 and cpu["images_per_s"] == pytest.approx(20 * 64 / 2.0)
    assert cpu["epoch_s"] == pytest.approx(100 * 0.1)
    fast = [{**e, "time": 100.0 + 0.4 * (e["step"] // 5)} for e in events]
    group = {"device": "cpu*2", "processes": 2, **throughput(fast, 64, 100)}
    rows = [cpu, group, {"device": "cuda:0", "processes": 1, "error": "boom"}]
    add_ratios(rows)
    assert rows[1]["speedup_vs_cpu"] == pytest.approx(1.25) and rows[1]["scaling_efficiency"] == pytest.approx(0.625)
    assert rows[0]["speedup_vs_cpu"] == pytest.approx(1.0) and rows[0]["scaling_efficiency"] is None
    table = format_table(rows)
    assert "| cpu*2 | 2 | 800.0 |" in table and "| 1.25 |" in table and "failed: boom" in table
    assert "error" in throughput(events[:1], 64, 100)


def test_tensorboard_listens_on_loopback_only(history: list[RunDir], runs_dir: Path) -> None:
    command = tensorboard_command(history[:2], runs_dir)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert f"{history[0].id}:{history[0].tb_dir.resolve()}" in command[command.index("--logdir_spec") + 1]
    port = int(command[command.index("--port") + 1])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def listening() -> bool:
            assert server.poll() is None, "tensorboard exited"
            return any(f":{port:04X} " in line for line in Path("/proc/net/tcp").read_text().splitlines()
                       + Path("/proc/net/tcp6").read_text().splitlines())
        wait_for(listening, 120, "tensorboard to listen")
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                + Path("/proc/net/tcp6").read_text().splitlines()[1:]]
        local = {row[1] for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A"}  # 0A = LISTEN
        assert local == {f"0100007F:{port:04X}"}  # 127.0.0.1 only
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_corrupt_store_is_one_line_and_rebuild_fixes_it(history: list[RunDir], runs_dir: Path) -> None:
    assert invoke("runs")[0] == 0
    (runs_dir / "kdtui.json").write_text('{"runs": {"1": {"id": ')
    code, _, err = invoke("runs", "--json")
    assert code == 2 and err.count("\n") == 1 and "kdtui runs --rebuild" in err
    code, out, _ = invoke("runs", "--rebuild", "--json")
    assert code == 0 and {d["id"] for d in json.loads(out)} == {r.id for r in history}


def test_follow_reports_the_status_its_job_ended_with_not_an_older_one(runs_dir: Path) -> None:
    """A queued job's poll() reads run.json itself: when the run finishes between follow's reads,
    the status follow reports must be the finished one (it once said `failed` here)."""
    from rich.console import Console

    from tui.follow import follow

    run = fake_run(runs_dir, "racing", "running", host=socket.gethostname(), pid=os.getpid())

    class FinishesWhilePolled:
        pid = os.getpid()

        def poll(self) -> int:
            run.update_info(status="finished")  # the engine's last write lands between the two reads
            return 0

    job = FinishesWhilePolled()
    statuses = follow([(run, job)], console=Console(file=io.StringIO()), poll_s=0.01)  # type: ignore[list-item]
    assert statuses == {run.id: "finished"}
