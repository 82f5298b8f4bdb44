"""`kdtui slurm`: one SLURM job array per recipe, one array task per sweep point.

The run directories are created here, `queued`, on the shared filesystem before anything is
submitted, so `kdtui runs` and the TUI show the whole sweep at once. The batch script
(RUNS/slurm/<sweep>/job.sbatch) holds the run directories in a bash array, shell-quoted, and
task K trains runs[K] (SLURM_ARRAY_TASK_ID); `--max-parallel N` is the array's `%N` throttle.
A recipe without a sweep is a one-task array, so stop, resubmission and the task steps have one
code path. A point on one process runs `python -m engine`; several processes or nodes run
torchrun under srun as before (rank 0, on the task's first node, writes the run directory).
`--submit` runs `sbatch --parsable` and records JOBID_TASK in each run.json (`slurm_job`);
`kdtui stop RUN` then runs `scancel JOBID_TASK` (tui/slurm_array.py). A requeued task, or one
resubmitted with `sbatch --array=K job.sbatch`, resumes from last.pt.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tui.cli import app
from tui.commands.common import Overrides, RunsDir, fail, plain, root, user_errors

if TYPE_CHECKING:
    from engine.rundir import RunDir
    from tui.launcher import Prepared

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "slurm.sbatch"
_DIRECTIVE_SAFE = re.compile(r"^[^\s\"'\\]+$")  # sbatch splits #SBATCH lines at blanks


@dataclass(frozen=True)
class Layout:
    """What every task of the array gets: nodes, processes per node, and the device kind."""

    nodes: int
    nproc: int
    kind: str  # 'cuda' | 'cpu'

    @property
    def spec(self) -> str:
        """The device string recorded as the run's `launch.device` (cuda:0,1 / cpu*2 / cuda:0 / cpu)."""
        if self.kind == "cuda":
            return "cuda:" + ",".join(str(i) for i in range(self.nproc))
        return f"cpu*{self.nproc}" if self.nproc > 1 else "cpu"

    @property
    def shown(self) -> str:
        return f"{self.nodes}x{self.spec}" if self.nodes > 1 else self.spec


@app.command()
@user_errors
def slurm(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    nodes: Annotated[int, typer.Option("--nodes", help="Machines per task (SBATCH --nodes).")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per machine, one process each "
                                                                       "(processes with train.device=cpu).")] = 1,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    partition: Annotated[str | None, typer.Option("--partition", help="SBATCH --partition.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="SBATCH --time, e.g. 12:00:00.")] = None,
    cpus_per_node: Annotated[int, typer.Option("--cpus-per-node", help="CPUs for each node's task.")] = 8,
    port: Annotated[int, typer.Option("--port", help="Rendezvous port on a task's first node (+ task index).")
                    ] = 29500,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", help="At most N tasks at once (%N).")
                            ] = None,
    submit: Annotated[bool, typer.Option("--submit", help="Submit with sbatch after writing.")] = False,
) -> None:
    """Write (and optionally submit) one SLURM job array, a task per sweep point; prints the script path."""
    from engine.rundir import new_run_id
    from tui.launcher import prepare
    from tui.store import RunStore, doc_from_run

    if nodes < 1 or not 1 <= gpus_per_node <= 64:
        raise fail(f"--nodes >= 1 and 1 <= --gpus-per-node <= 64 expected, got {nodes} and {gpus_per_node}")
    if not 1024 <= port <= 65535:
        raise fail(f"--port: expected 1024..65535, got {port}")
    if time_limit and not re.match(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$", time_limit):
        raise fail(f"--time: expected [D-]HH[:MM[:SS]], got {time_limit!r}")
    if partition and not re.match(r"^[\w.,-]+$", partition):
        raise fail(f"--partition: expected a partition name, got {partition!r}")
    if max_parallel is not None and max_parallel < 1:
        raise fail(f"--max-parallel: expected a whole number >= 1, got {max_parallel}")
    if cpus_per_node < 1:
        raise fail(f"--cpus-per-node: expected a whole number >= 1, got {cpus_per_node}")
    sbatch = shutil.which("sbatch")
    if submit and not sbatch:
        raise fail("--submit: sbatch not found on PATH; run this on the cluster's login node (or submit the script)")
    # cuda is the cluster default; `--set train.device=cpu` (later, so it wins) runs the tasks on CPU
    prepared = prepare(recipe, ['train.device="cuda"', *(overrides or [])], runs_dir)
    layout = Layout(nodes, gpus_per_node, device_kind(prepared))
    runs_root = root(runs_dir).resolve()
    sweep_dir = runs_root / "slurm" / new_run_id(prepared.recipe.run.name)
    sweep_dir.mkdir(parents=True)
    script = sweep_dir / "job.sbatch"
    runs = create_array_runs(prepared, runs_root, layout, script)
    output = str(sweep_dir).replace("%", "%%") + "/task-%A_%a.out"  # a literal % in a path is %% to sbatch
    script.write_text(render(runs, script, layout, cpus_per_node, port, partition, time_limit, max_parallel, output),
                      encoding="utf-8")
    store = RunStore(runs_root)
    store.upsert_many([doc_from_run(run) for run in runs])
    for index, run in enumerate(runs):
        point = " ".join(f"{k}={v}" for k, v in (run.read_info().get("sweep_point") or {}).items())
        print(plain(f"task {index}  {run.id}  {point}".rstrip()))
    print(script)
    if not submit:
        return
    assert sbatch is not None
    from tui.slurm_array import run_lock, submit_lock

    with submit_lock(sweep_dir):  # tasks wait at their start step until every run.json has its job id
        job = run_sbatch(sbatch, script, output, runs)
        for index, run in enumerate(runs):
            with run_lock(run):
                run.update_info(slurm_job=f"{job}_{index}", slurm_array_job=job)
    store.upsert_many([doc_from_run(run) for run in runs])
    throttle = f", at most {max_parallel} at once" if max_parallel else ""
    print(f"submitted job array {job} ({len(runs)} task{'s' * (len(runs) != 1)}{throttle}); `kdtui runs` lists "
          f"them, `kdtui stop RUN` cancels one")
    for index, run in enumerate(runs):
        print(f"  {job}_{index}  {run.id}")


def device_kind(prepared: Prepared) -> str:
    """cuda or cpu, the same for every sweep point (one array has one kind of resource)."""
    devices = {recipe.train.device for _, recipe in prepared.points}
    kinds = {"cuda" if d == "cuda" or d.startswith("cuda:") else d for d in devices}
    if len(kinds) != 1 or not kinds <= {"cuda", "cpu"}:
        raise fail(f"{prepared.source}: train.device: expected cuda (the default under SLURM) or cpu for every "
                   f"sweep point, got {', '.join(sorted(devices))}")
    return kinds.pop()


def create_array_runs(prepared: Prepared, runs_root: Path, layout: Layout, script: Path) -> list[RunDir]:
    """Queued run directories, point i = array task i, each saying how its task launches it."""
    from dataclasses import replace

    from tui.launcher import create_runs

    runs = []
    for index, (point, recipe) in enumerate(prepared.points):
        recipe = recipe.model_copy(deep=True)
        recipe.train.device = layout.kind  # each rank of a group picks cuda:LOCAL_RANK
        launch = {"device": layout.spec, "nnodes": layout.nodes, "node_rank": None, "rdzv_endpoint": "slurm",
                  "scheduler": "slurm"}
        runs += create_runs(replace(prepared, points=[(point, recipe)]), runs_root,
                            {"device": layout.shown, "launch": launch, "slurm_script": str(script),
                             "slurm_array_index": index, "slurm_job": None})
    return runs


def run_sbatch(sbatch: str, script: Path, output: str, runs: list[RunDir]) -> str:
    """`sbatch --parsable SCRIPT` -> the array's job id. On failure the runs become `interrupted`
    (with the command that submits them) instead of staying `queued` for ever."""
    command = [sbatch, "--parsable", f"--output={output}", str(script)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        lines = (out.stdout or "").strip().splitlines()
        job = lines[-1].split(";")[0].strip() if lines else ""
        problem = None if out.returncode == 0 and job.isdigit() else (
            ((out.stderr or out.stdout).strip().splitlines() or [f"exit {out.returncode}"])[-1]
            if out.returncode else f"printed {out.stdout.strip()!r}, expected a job id")
    except (OSError, subprocess.TimeoutExpired) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem is None:
        return job
    from tui.slurm_array import run_lock

    for run in runs:
        with run_lock(run):
            run.update_info(status="interrupted", ended=time.time(),
                            error=f"not submitted (sbatch: {problem}); `sbatch {script}` submits the array")
    raise fail(f"sbatch {script}: {problem}; nothing was submitted (the runs are marked interrupted; "
               f"`sbatch {script}` submits them)")


def render(runs: list[RunDir], script: Path, layout: Layout, cpus_per_node: int, port: int, partition: str | None,
           time_limit: str | None, max_parallel: int | None, output: str) -> str:
    """The template with this array's values; every path is shell-quoted."""
    from tui.launcher import PROJECT_ROOT

    options = []
    if layout.kind == "cuda":
        options.append(f"#SBATCH --gpus-per-node={layout.nproc}")
    if partition:
        options.append(f"#SBATCH --partition={partition}")
    if time_limit:
        options.append(f"#SBATCH --time={time_limit}")
    if _DIRECTIVE_SAFE.match(output):
        options.append(f"#SBATCH --output={output}")
    else:  # a runs folder with blanks or quotes: `kdtui slurm --submit` passes --output on the command line
        options.append(f"# (by hand: sbatch --output={shlex.quote(output)} ...; the path cannot be a directive)")
    python = shlex.quote(sys.executable)
    if layout.nodes == 1 and layout.nproc == 1:
        launch = f'{python} -m engine "$run_dir" ${{resume[@]+"${{resume[@]}}"}} || code=$?'
    else:
        launch = "\n".join([
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f"port=$(( ({port} - 1024 + task) % 64512 + 1024 ))  # a port per task: tasks may share a node",
            f"srun --kill-on-bad-exit=1 {python} -m torch.distributed.run \\",
            f'    --nnodes "$SLURM_NNODES" --nproc-per-node {layout.nproc} --max-restarts 0 \\',
            '    --rdzv-backend c10d --rdzv-endpoint "$head_node:$port" --rdzv-id "kdtui-$SLURM_JOB_ID" \\',
            '    -m engine "$run_dir" ${resume[@]+"${resume[@]}"} || code=$?',
        ])
    name = runs[0].read_info().get("name") or runs[0].id
    values = {
        "JOB_NAME": re.sub(r"[^\w.=+-]", "_", f"kdtui-{name}")[:64],
        "TASKS": str(len(runs)),
        "ARRAY": f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
        "NODES": str(layout.nodes),
        "NPROC": str(layout.nproc),
        "DEVICE": layout.shown,
        "CPUS": str(cpus_per_node),
        "OPTIONS": "\n".join(options),
        "RUNS": "\n".join(f"    {shlex.quote(str(run.path.resolve()))}" for run in runs),
        "PROJECT_ROOT": shlex.quote(str(PROJECT_ROOT)),
        "PYTHON": python,
        "SWEEP_DIR": shlex.quote(str(script.parent)),
        "LAUNCH": launch,
    }
    # one pass, so a run path that happens to contain "{{...}}" is never substituted again
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match[1]], TEMPLATE.read_text(encoding="utf-8"))
