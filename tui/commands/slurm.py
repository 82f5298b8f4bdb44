"""`kdtui slurm`: a batch script that runs one recipe's job over several nodes with torchrun.

The run directory is created here, on the shared filesystem, before submission: every node
runs the same `torchrun ... -m engine RUN_DIR` command (srun starts one per node), the c10d
rendezvous on the first node assigns ranks, and global rank 0 writes the run directory.
A requeued or preempted job resumes from last.pt by itself.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tui.cli import app
from tui.commands.common import Overrides, RunsDir, fail, root, user_errors

if TYPE_CHECKING:
    from engine.rundir import RunDir
    from tui.launcher import Prepared

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "slurm.sbatch"


@app.command()
@user_errors
def slurm(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    nodes: Annotated[int, typer.Option("--nodes", help="Machines (SBATCH --nodes).")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per machine, one process each.")] = 1,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    partition: Annotated[str | None, typer.Option("--partition", help="SBATCH --partition.")] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="SBATCH --time, e.g. 12:00:00.")] = None,
    cpus_per_node: Annotated[int, typer.Option("--cpus-per-node", help="CPUs for each node's task.")] = 8,
    port: Annotated[int, typer.Option("--port", help="Rendezvous port on the first node.")] = 29500,
    submit: Annotated[bool, typer.Option("--submit", help="Submit with sbatch after writing.")] = False,
) -> None:
    """Write (and optionally submit) a SLURM batch script per sweep point; prints the script paths."""
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
    sbatch = shutil.which("sbatch")
    if submit and not sbatch:
        raise fail("--submit: sbatch not found on PATH; run this on the cluster's login node (or submit the script)")
    prepared = prepare(recipe, [*(overrides or []), 'train.device="cuda"'], runs_dir)
    runs = create_slurm_runs(prepared, root(runs_dir), nodes, gpus_per_node)
    store = RunStore(root(runs_dir).resolve())
    for run in runs:
        script = run.path / "slurm.sbatch"
        script.write_text(render(run.path, run.read_info().get("name") or run.id, nodes, gpus_per_node, cpus_per_node,
                                 port, partition, time_limit))
        store.upsert(doc_from_run(run))
        print(script)
        if submit:
            out = subprocess.run([sbatch, str(script)], capture_output=True, text=True, check=False)
            if out.returncode:
                raise fail(f"sbatch {script}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
            job = out.stdout.strip().split()[-1]
            run.update_info(slurm_job=job)
            print(f"  submitted: job {job}")


def create_slurm_runs(prepared: Prepared, runs_root: Path, nodes: int, gpus_per_node: int) -> list[RunDir]:
    """Queued run directories whose launch says: torchrun over `nodes` x `gpus_per_node` under SLURM."""
    from dataclasses import replace

    from tui.launcher import create_runs

    spec = "cuda:" + ",".join(str(i) for i in range(gpus_per_node))
    launch = {"device": spec, "nnodes": nodes, "node_rank": None, "rdzv_endpoint": "slurm", "scheduler": "slurm"}
    runs = []
    for point in prepared.points:
        runs += create_runs(replace(prepared, points=[point]), runs_root.resolve(),
                            {"device": f"{nodes}x{spec}" if nodes > 1 else spec, "launch": launch})
    return runs


def render(run_dir: Path, name: str, nodes: int, gpus_per_node: int, cpus_per_node: int, port: int,
           partition: str | None, time_limit: str | None) -> str:
    """The template with this run's values; every value is shell-quoted."""
    from tui.launcher import PROJECT_ROOT

    options = []
    if partition:
        options.append(f"#SBATCH --partition={partition}")
    if time_limit:
        options.append(f"#SBATCH --time={time_limit}")
    values = {
        "JOB_NAME": re.sub(r"[^\w.=+-]", "_", f"kdtui-{name}")[:64],
        "NODES": str(nodes),
        "GPUS": str(gpus_per_node),
        "CPUS": str(cpus_per_node),
        "LOG": str(run_dir / "train.log"),
        "OPTIONS": "\n".join(options),
        "PROJECT_ROOT": shlex.quote(str(PROJECT_ROOT)),
        "PYTHON": shlex.quote(sys.executable),
        "RUN_DIR": shlex.quote(str(run_dir)),
        "PORT": str(port),
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text
