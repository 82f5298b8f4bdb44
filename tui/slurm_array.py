"""The SLURM job-array side of `kdtui slurm`: what each array task runs around the engine, and stop.

An array task (tui/templates/slurm.sbatch) runs `python -m tui.slurm_array start RUN_DIR SWEEP_DIR`,
then the engine, then `python -m tui.slurm_array end RUN_DIR CODE`:

- start waits until the submitting `kdtui slurm --submit` has recorded every task's job id (it
  holds SWEEP_DIR/.submit.lock from before sbatch until then: run.json is read-modify-written,
  and the engine must not start while the login node still writes it), then records this task's
  `slurm_job` (JOBID_TASK) and node in run.json. It exits 3 for a run that already finished, so
  resubmitting a whole array reruns only the unfinished points.
- end marks a run whose engine exited without saying how it ended (killed, crashed) and records
  the run in the store index (best effort: `kdtui runs` catches up from the run directory).

Every launcher-side write of a SLURM run's run.json holds the run's `.slurm.lock`: a NetLock,
because the login node and the compute nodes share the folder over NFS. Torch-free.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import UserError
from engine.rundir import RunDir, effective_status
from tui.netlock import LockTimeout, NetLock

SUBMIT_LOCK = ".submit.lock"
RUN_LOCK = ".slurm.lock"
SUBMIT_WAIT_S = 600.0  # a task waits this long for a slow sbatch to return before going ahead
SKIP = 3  # `start` exit code: the run already finished
TERMINAL = ("finished", "failed", "interrupted")


def run_lock(run: RunDir) -> NetLock:
    """Serialises read-modify-writes of one SLURM run's run.json by the login node and its task."""
    return NetLock(run.path / RUN_LOCK, timeout=60)


def submit_lock(sweep_dir: Path, timeout: float = 60) -> NetLock:
    return NetLock(sweep_dir / SUBMIT_LOCK, timeout=timeout)


def resubmit_hint(info: dict[str, object]) -> str:
    """The command that reruns one run's task (it resumes from last.pt)."""
    script, index = info.get("slurm_script"), info.get("slurm_array_index")
    return f"sbatch --array={index} {script}" if script and index is not None else "sbatch its script"


# ---------------------------------------------------------------- login node: stop


def stop_array_task(run: RunDir) -> str:
    """`scancel JOBID_TASK` for a run's array task; a task that had not started becomes `interrupted`."""
    info = run.read_info()
    job, status = info.get("slurm_job"), effective_status(info)
    if status not in ("queued", "running"):
        raise UserError(f"{run.id} is not running (status {status})")
    scancel = shutil.which("scancel")
    if not scancel:
        raise UserError(f"{run.id} is SLURM array task {job}: scancel not found on PATH; run `kdtui stop` "
                        f"on the cluster's login node (or `scancel {job}`)")
    try:
        out = subprocess.run([scancel, str(job)], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"scancel {job}: no answer within 60 s; the task may still be running") from None
    if out.returncode:
        reason = (out.stderr or out.stdout).strip().splitlines()
        raise UserError(f"scancel {job} failed (exit {out.returncode}): {reason[-1] if reason else 'no message'}")
    hint = resubmit_hint(info)
    with run_lock(run):
        if run.read_info().get("status") == "queued":
            run.update_info(status="interrupted", ended=time.time(),
                            error=f"cancelled with scancel {job} before it started; `{hint}` runs it")
            return f"{run.id}: cancelled array task {job} before it started (`{hint}` runs it again)"
    return (f"{run.id}: scancel {job}: SLURM sends SIGTERM; the run checkpoints and becomes interrupted "
            f"(`{hint}` resumes it)")


# ---------------------------------------------------------------- compute node: the task's steps


def task_job_id() -> str | None:
    """JOBID_TASK of this array task from SLURM's environment (a plain job: its job id)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def start(run: RunDir, sweep_dir: Path) -> int:
    """Before the engine: wait for the submitter, record job id and node; 3 = already finished."""
    try:
        with submit_lock(sweep_dir, SUBMIT_WAIT_S):
            pass
    except LockTimeout as err:
        print(f"kdtui: warning: {err}; starting anyway", flush=True)
    with run_lock(run):
        info = run.read_info()
        if not info:
            print(f"kdtui: {run.info_path}: missing or unreadable; is the runs folder shared with this node?")
            return 2
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is not None and str(info.get("slurm_array_index")) != task:
            print(f"kdtui: {run.path}: run.json says array task {info.get('slurm_array_index')}, "
                  f"this is task {task}; the script does not match its runs")
            return 2
        if info.get("status") == "finished":
            print(f"kdtui: {run.id} already finished; array task {task_job_id()} skips it", flush=True)
            return SKIP
        if info.get("status") != "queued" and not (run.checkpoints / "last.pt").exists():
            run.metrics_path.unlink(missing_ok=True)  # starting over: drop the partial curves
            shutil.rmtree(run.tb_dir, ignore_errors=True)
        host = socket.gethostname()
        run.update_info(status="queued", slurm_job=task_job_id(), slurm_node=host, host=host, error=None, ended=None,
                        slurm_restarts=int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    resuming = " (resuming from last.pt)" if (run.checkpoints / "last.pt").exists() else ""
    print(f"kdtui: array task {task_job_id()} on {host}: {run.id}{resuming}", flush=True)
    return 0


def end(run: RunDir, code: int) -> int:
    """After the engine: mark a run it could not report on, update the index; returns the engine's code."""
    from tui.store import RunStore, StoreError, doc_from_run

    if not run.info_path.exists():
        print(f"kdtui: {run.info_path}: gone; nothing to record")
        return code
    with run_lock(run):
        info = run.read_info()
        if info.get("status") not in TERMINAL:
            if code < 0 or code in (130, 137, 143):  # 128 + SIGINT / SIGKILL / SIGTERM
                status, error = "interrupted", f"engine killed (exit {code}); `{resubmit_hint(info)}` resumes it"
            else:
                status, error = "failed", f"engine exited with code {code} before reporting; see train.log"
            run.update_info(status=status, error=error, ended=time.time())
    try:
        RunStore(run.path.parent).upsert(doc_from_run(run))
    except (StoreError, OSError) as err:  # the run directory has it; `kdtui runs` syncs the index later
        print(f"kdtui: warning: run store not updated ({err})", flush=True)
    print(f"kdtui: array task {task_job_id()} ended: {run.read_info().get('status')} (exit {code})", flush=True)
    return code


def main(argv: list[str]) -> int:
    usage = "usage: python -m tui.slurm_array start RUN_DIR SWEEP_DIR | end RUN_DIR EXIT_CODE"
    if len(argv) != 3 or argv[0] not in ("start", "end"):
        print(usage, file=sys.stderr)
        return 2
    run = RunDir(Path(argv[1]))
    if argv[0] == "start":
        return start(run, Path(argv[2]))
    try:
        code = int(argv[2])
    except ValueError:
        print(f"{usage} (EXIT_CODE {argv[2]!r} is not a number)", file=sys.stderr)
        return 2
    return end(run, code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
