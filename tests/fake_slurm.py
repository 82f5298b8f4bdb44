"""A stand-in for SLURM's sbatch and scancel in tests: `python fake_slurm.py sbatch|scancel|schedule ARGS`.

`install(bin_dir, state_dir)` writes `sbatch` and `scancel` scripts that call this file (and a
one-node `srun` and `scontrol show hostnames` for multi-process tasks). State
lives in the state folder: calls.jsonl (every call's arguments), next_id, and per job a folder
with job.json and, per task, TASK.pid / TASK.exit / TASK.cancelled.

sbatch reads #SBATCH directives as the real one does (up to the first command; the command
line wins), assigns a job id, starts a detached scheduler that runs the array's tasks as local
processes (`bash SCRIPT`, at most %N at once) with SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID and
SLURM_JOB_ID set, and returns at once (`--parsable`: just the id). scancel JOBID_TASK (or JOBID)
drops a pending task, or sends SIGCONT then SIGTERM to a running task's process group, as
slurmd does (no SIGKILL after KillWait here).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def install(bin_dir: Path, state: Path) -> None:
    """Executable `sbatch` and `scancel` in bin_dir, recording into `state`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    for name in ("sbatch", "scancel"):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nFAKE_SLURM_DIR="{state}" exec "{sys.executable}" "{Path(__file__).resolve()}" '
                        f'{name} "$@"\n')
        path.chmod(0o755)
    # inside a task: srun runs its command here (one node), scontrol names this machine
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)


def calls(state: Path, command: str | None = None) -> list[list[str]]:
    """The argument lists of every recorded call (of one command)."""
    path = state / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [row["args"] for row in rows if command in (None, row["command"])]


def job_info(state: Path, job: str) -> dict[str, Any]:
    return json.loads((state / job / "job.json").read_text())


def jobs_done(state: Path) -> bool:
    return all((folder / "done").exists() for folder in state.iterdir() if (folder / "job.json").exists())


def kill_everything(state: Path) -> None:
    """Test cleanup: SIGKILL every task still running and stop the schedulers."""
    for pid_file in state.glob("*/*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


# ---------------------------------------------------------------- the commands


def _record(state: Path, command: str, args: list[str]) -> None:
    with open(state / "calls.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"command": command, "args": args}) + "\n")


def parse_array(spec: str) -> tuple[list[int], int | None]:
    """'0-3%2' -> ([0, 1, 2, 3], 2); '0,2' -> ([0, 2], None); '0-15:4' -> ([0, 4, 8, 12], None)."""
    body, _, throttle = spec.partition("%")
    tasks: list[int] = []
    for part in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not match:
            raise ValueError(f"sbatch: error: invalid array specification {spec!r}")
        first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
        tasks += range(first, last + 1, step)
    return sorted(set(tasks)), int(throttle) if throttle else None


_SHORT = {"-a": "array", "-o": "output", "-J": "job-name", "-c": "cpus-per-task", "-N": "nodes"}
_VALUED = {"array", "output", "job-name", "cpus-per-task", "nodes", "partition", "time"}


def _options(args: list[str]) -> tuple[dict[str, str], int]:
    """Options (--key=value, --key value, -a value, --flag) up to the first other word, and its index."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            found[key] = value
        elif arg in _SHORT or arg[2:] in _VALUED:
            found[_SHORT.get(arg, arg[2:])] = args[i + 1] if i + 1 < len(args) else ""
            i += 1
        else:
            found[arg.lstrip("-")] = ""
        i += 1
    return found, i


def _directives(script: Path) -> list[str]:
    args = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            args += line.split()[1:]
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops at the first command
    return args


def sbatch(state: Path, args: list[str]) -> int:
    _record(state, "sbatch", args)
    given, split = _options(args)
    if split >= len(args):
        print("sbatch: error: no batch script given", file=sys.stderr)
        return 1
    script = Path(args[split]).resolve()
    options = {**_options(_directives(script))[0], **given}
    try:
        tasks, throttle = parse_array(options["array"]) if "array" in options else ([], None)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 1
    with open(state / "next_id.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        counter = state / "next_id"
        job = int(counter.read_text()) if counter.exists() else 4000
        counter.write_text(str(job + len(tasks) + 1))
    folder = state / str(job)
    folder.mkdir()
    info = {"job": job, "script": str(script), "args": args[split + 1:], "tasks": tasks, "throttle": throttle,
            "output": options.get("output", "slurm-%A_%a.out"), "cpus": options.get("cpus-per-task", "1"),
            "cwd": os.getcwd(), "max_running": 0}
    (folder / "job.json").write_text(json.dumps(info))
    with open(folder / "scheduler.log", "w") as log:
        subprocess.Popen([sys.executable, __file__, "schedule", str(job)], start_new_session=True, close_fds=True,
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    print(job if "parsable" in options else f"Submitted batch job {job}")
    return 0


def _output(pattern: str, job: int, task: int, task_job: int) -> str:
    values = {"A": str(job), "a": str(task), "j": str(task_job), "%": "%"}
    return re.sub(r"%([Aaj%])", lambda m: values[m[1]], pattern)


def schedule(state: Path, job: int) -> int:
    """Run the job's tasks, at most `throttle` at once, until all ended or were cancelled."""
    folder = state / str(job)
    info = json.loads((folder / "job.json").read_text())
    pending: list[int] = list(info["tasks"]) or [0]
    running: dict[int, subprocess.Popen[bytes]] = {}
    limit = info["throttle"] or len(pending)
    while pending or running:
        for task, process in list(running.items()):
            if process.poll() is not None:
                (folder / f"{task}.exit").write_text(str(process.returncode))
                del running[task]
        while pending and len(running) < limit:
            task = pending.pop(0)
            if (folder / f"{task}.cancelled").exists():
                continue
            task_job = job + 1 + task
            env = {**os.environ, "SLURM_JOB_ID": str(task_job), "SLURM_CPUS_PER_TASK": str(info["cpus"]),
                   "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": info["cwd"]}
            env.pop("FAKE_SLURM_DIR", None)
            if info["tasks"]:
                env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task),
                           SLURM_ARRAY_TASK_COUNT=str(len(info["tasks"])))
            out = Path(info["cwd"]) / _output(info["output"], job, task, task_job)
            with open(out, "ab") as log:
                running[task] = subprocess.Popen(["bash", info["script"], *info["args"]], cwd=info["cwd"], env=env,
                                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
            (folder / f"{task}.pid").write_text(str(running[task].pid))
            info["max_running"] = max(info["max_running"], len(running))
            (folder / "job.json").write_text(json.dumps(info))
        time.sleep(0.05)
    (folder / "done").write_text("")
    return 0


def scancel(state: Path, args: list[str]) -> int:
    _record(state, "scancel", args)
    for target in (a for a in args if not a.startswith("-")):
        job, _, task = target.partition("_")
        folder = state / job
        if not job.isdigit() or not folder.is_dir():
            print(f"scancel: error: Kill job error on job id {target}: Invalid job id specified", file=sys.stderr)
            return 1
        tasks = [int(task)] if task else json.loads((folder / "job.json").read_text())["tasks"]
        for t in tasks:
            (folder / f"{t}.cancelled").write_text("")
            pid_file = folder / f"{t}.pid"
            if pid_file.exists() and not (folder / f"{t}.exit").exists():
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(pid_file.read_text()), sig)
    return 0


def main() -> int:
    state = Path(os.environ.get("FAKE_SLURM_DIR") or Path(__file__).parent)
    command, args = sys.argv[1], sys.argv[2:]
    if command == "schedule":
        return schedule(Path(os.environ["FAKE_SLURM_DIR"]), int(args[0]))
    return {"sbatch": sbatch, "scancel": scancel}[command](state, args)


if __name__ == "__main__":
    sys.exit(main())
