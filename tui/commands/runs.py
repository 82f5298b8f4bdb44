"""Run history commands: runs, show, stop, relaunch, tag, note, rm, tensorboard.

All of them read the run directories (the source of truth) through tui/store.py; RUN is a
run id, a unique id prefix, a run name or a run directory (see `find_run`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from tui.cli import app
from tui.commands.common import Overrides, RunsDir, fail, plain, plain_doc, root, user_errors
from tui.commands.run import Detach, Devices, PerDevice, _follow, _report, find_run

RunRef = Annotated[str, typer.Argument(help="Run id, unique id prefix, run name, or run directory.")]
STATUSES = ("queued", "running", "finished", "failed", "interrupted")


@app.command("runs")
@user_errors
def runs_(
    runs_dir: RunsDir = None,
    status: Annotated[str | None, typer.Option("--status", help=f"One of {', '.join(STATUSES)}.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Only runs of this method.")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Only runs with this tag.")] = None,
    grep: Annotated[str | None, typer.Option("--grep", help="Text in the id, name, note or tags.")] = None,
    sort: Annotated[str | None, typer.Option("--sort", help="A field or metric, e.g. val.top1 or created.")] = None,
    ascending: Annotated[bool, typer.Option("--asc", help="Smallest first (default: largest first).")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Show at most N runs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of run documents.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (best.*, last.*, params.* columns).")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Recreate kdtui.json from the run directories.")] = False,
) -> None:
    """List runs: filter, sort by a metric, export as JSON or CSV."""
    from tui.store import RunStore, sort_docs

    if status and status not in STATUSES:
        raise fail(f"--status: expected one of {', '.join(STATUSES)}, got {status!r}")
    if as_json and as_csv:
        raise fail("--json and --csv: choose one")
    if limit is not None and limit < 1:
        raise fail(f"--limit: expected a whole number >= 1, got {limit}")
    store = RunStore(root(runs_dir))
    if rebuild:
        count = store.rebuild()
        print(f"rebuilt {store.path} from {count} run director{'y' if count == 1 else 'ies'}", file=sys.stderr)
    store.sync()
    docs = store.query(status=status, method=method, tag=tag, text=grep)
    docs = sort_docs(docs, sort, descending=not ascending) if sort else docs[::-1]  # newest first by default
    docs = docs[:limit] if limit else docs
    if as_json:
        print(json.dumps(docs, indent=2, default=str))
    elif as_csv:
        _write_csv(docs)
    else:
        _print_table(docs, sort)


def _print_table(docs: list[dict[str, Any]], sort: str | None) -> None:
    from tui.store import metric_value

    if not docs:
        print("no runs (kdtui run RECIPE starts one)", file=sys.stderr)
        return
    rows = []
    for doc in docs:
        best = doc.get("best") or {}
        metric = best.get("metric")
        shown = f"{metric}={best[metric]:.4f}" if metric in best and isinstance(best[metric], float) else ""
        if sort and sort not in ("created", "started", "ended", "epoch", "name", "id"):
            value = metric_value(doc, sort)
            shown = f"{sort}={value:.4f}" if isinstance(value, float) else f"{sort}={value}"
        rows.append([doc["id"], doc.get("status") or "", doc.get("method") or "", doc.get("arch") or "",
                     str(doc.get("device") or ""), f"{doc.get('epoch') or 0}/{doc.get('epochs') or '?'}", shown,
                     " ".join(doc.get("tags") or [])])
    rows = [[plain(cell) for cell in row] for row in rows]  # a tag with ESC or a newline prints as text
    header = ["ID", "STATUS", "METHOD", "ARCH", "DEVICE", "EPOCH", "BEST", "TAGS"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _write_csv(docs: list[dict[str, Any]]) -> None:
    base = ["id", "name", "status", "method", "arch", "dataset", "device", "epoch", "epochs", "created", "started",
            "ended", "tags", "note", "error", "recipe_path", "git_commit", "run_dir"]
    flat = []
    for doc in docs:
        row = {key: doc.get(key) for key in base}
        row["tags"] = ";".join(doc.get("tags") or [])
        for section in ("best", "last", "params"):
            for key, value in (doc.get(section) or {}).items():
                row[f"{section}.{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
        flat.append(row)
    extra = sorted({key for row in flat for key in row} - set(base))
    writer = csv.DictWriter(sys.stdout, fieldnames=base + extra, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{key: _inert(value) for key, value in row.items()} for row in flat])


def _inert(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (=, +, -, @ first) gets a leading quote."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


@app.command()
@user_errors
def show(run_ref: RunRef, runs_dir: RunsDir = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the run document as JSON.")] = False) -> None:
    """One run: status, timings, best and last metrics, and its recipe values."""
    from tui.store import RunStore, doc_from_run

    run = find_run(run_ref, runs_dir)
    doc = doc_from_run(run)
    RunStore(run.path.parent).upsert(doc)
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
        return
    doc = plain_doc(doc)  # names, tags, notes and errors reach the terminal as text, never as escapes
    when = {k: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc[k])) if doc.get(k) else "-"
            for k in ("created", "started", "ended")}
    print(f"{doc['id']}  ({doc['name']})")
    print(f"  status   {doc['status']}" + (f"  error: {doc['error']}" if doc["error"] else ""))
    print(f"  method   {doc['method']}  arch {doc['arch']}  data {doc['dataset']}  device {doc['device']}  "
          f"pid {doc['pid']}@{doc['host']}")
    print(f"  epoch    {doc['epoch']}/{doc['epochs']}  step {doc['step']}")
    print(f"  times    created {when['created']}  started {when['started']}  ended {when['ended']}")
    print(f"  recipe   {doc['recipe_path']}  (sha256 {doc['recipe_hash']}, git {doc['git_commit'] or '-'})")
    print(f"  dir      {doc['run_dir']}")
    if doc["tags"] or doc["note"]:
        print(f"  tags     {' '.join(doc['tags']) or '-'}  note: {doc['note'] or '-'}")
    for section in ("best", "last"):
        values = doc[section]
        if values:
            print(f"  {section:<8} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in values.items()))
    if doc["sweep_point"]:
        print("  sweep    " + "  ".join(f"{k}={v}" for k, v in doc["sweep_point"].items()))


@app.command()
@user_errors
def stop(run_ref: RunRef, runs_dir: RunsDir = None) -> None:
    """SIGTERM a run's process group: it finishes its step, writes last.pt and becomes interrupted."""
    from tui.queue import stop_run
    from tui.store import RunStore, doc_from_run

    run = find_run(run_ref, runs_dir)
    print(stop_run(run))
    RunStore(run.path.parent).upsert(doc_from_run(run))


@app.command()
@user_errors
def relaunch(
    run_ref: RunRef,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    device: Devices = None,
    per_device: PerDevice = 1,
    detach: Detach = False,
) -> None:
    """A new run from a run's resolved recipe, with --set edits (and its device unless --device)."""
    import hashlib

    from tui.devices import parse_device_spec
    from tui.launcher import prepare
    from tui.queue import submit

    run = find_run(run_ref, runs_dir)
    info = run.read_info()
    if not run.recipe_path.is_file():
        raise fail(f"{run.path}: no recipe.toml to relaunch from")
    specs = [parse_device_spec(text) for text in device or [(info.get("launch") or {}).get("device") or "cpu"]]
    if per_device < 1:
        raise fail(f"--per-device: expected a whole number >= 1, got {per_device}")
    prepared = prepare(run.recipe_path, overrides, runs_dir)
    extra = {"parent": run.id, "recipe_path": info.get("recipe_path") or str(run.recipe_path),
             "recipe_hash": hashlib.sha256(run.recipe_path.read_bytes()).hexdigest()[:16]}
    new, queue_pid = submit(prepared, specs, run.path.parent, per_device, extra_info=extra)
    print(f"relaunched {run.id} as {', '.join(r.id for r in new)}")
    if detach:
        print(f"queue: pid {queue_pid}")
    else:
        _report(new, _follow(new, queue_pid))


@app.command()
@user_errors
def tag(run_ref: RunRef, tag_: Annotated[str, typer.Argument(metavar="TAG", help="Tag to add.")],
        runs_dir: RunsDir = None,
        remove: Annotated[bool, typer.Option("--remove", help="Remove the tag instead.")] = False) -> None:
    """Add (or --remove) a tag; `kdtui runs --tag TAG` filters by it."""
    from tui.store import RunStore, doc_from_run, read_annotations, write_annotations

    if not tag_.strip() or any(c.isspace() for c in tag_) or len(tag_) > 64:
        raise fail(f"tag {tag_!r}: expected one word of at most 64 characters")
    run = find_run(run_ref, runs_dir)
    tags = list(read_annotations(run).get("tags", run.read_info().get("tags") or []))
    if remove:
        if tag_ not in tags:
            raise fail(f"{run.id} has no tag {tag_!r} (tags: {', '.join(tags) or 'none'})")
        tags.remove(tag_)
    elif tag_ not in tags:
        tags.append(tag_)
    write_annotations(run, tags=tags)
    RunStore(run.path.parent).upsert(doc_from_run(run))
    print(f"{run.id}: tags {plain(' '.join(tags)) or '(none)'}")


@app.command()
@user_errors
def note(run_ref: RunRef, text: Annotated[str, typer.Argument(help="The note ('' clears it).")],
         runs_dir: RunsDir = None) -> None:
    """Attach a free-text note to a run (replaces the previous note)."""
    from tui.store import RunStore, doc_from_run, write_annotations

    if len(text) > 2000:
        raise fail(f"note: at most 2000 characters, got {len(text)}")
    run = find_run(run_ref, runs_dir)
    write_annotations(run, note=text)
    RunStore(run.path.parent).upsert(doc_from_run(run))
    print(f"{run.id}: note {'set' if text else 'cleared'}")


@app.command()
@user_errors
def rm(run_ref: RunRef, runs_dir: RunsDir = None,
       keep_files: Annotated[bool, typer.Option("--keep-files", help="Move the folder to RUNS/removed/ "
                                                                     "instead of deleting it.")] = False) -> None:
    """Remove a run from the history and delete its folder (not while it is queued or running)."""
    import shutil

    from engine.rundir import effective_status
    from tui.store import RunStore

    run = find_run(run_ref, runs_dir)
    status = effective_status(run.read_info())
    if status in ("queued", "running"):
        raise fail(f"{run.id} is {status}; `kdtui stop {run.id}` first")
    store = RunStore(run.path.parent)
    if keep_files:
        target = run.path.parent / "removed" / run.id
        target.parent.mkdir(exist_ok=True)
        run.path.rename(target)
        print(f"{run.id}: removed from the history; files moved to {target}")
    else:
        shutil.rmtree(run.path)
        print(f"{run.id}: removed")
    store.remove(run.id)


@app.command()
@user_errors
def tensorboard(
    run_refs: Annotated[list[str] | None, typer.Argument(metavar="[RUN]...", help="Runs (default: all).")] = None,
    runs_dir: RunsDir = None,
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (0 picks a free one).")] = 0,
) -> None:
    """TensorBoard over the runs' tb/ folders, bound to 127.0.0.1; prints the port to forward over SSH."""
    import socket
    import subprocess

    if not 0 <= port <= 65535:
        raise fail(f"--port: expected 0..65535, got {port}")
    command = tensorboard_command([find_run(ref, runs_dir) for ref in run_refs or []], root(runs_dir), port)
    port = int(command[command.index("--port") + 1])
    host = socket.gethostname()
    print(f"TensorBoard on http://127.0.0.1:{port}/ (only this machine)\n"
          f"  from your laptop: ssh -N -L {port}:127.0.0.1:{port} {host}   then open http://localhost:{port}/\n"
          f"  Ctrl-C stops it", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(command, check=False)


def tensorboard_command(runs: list[Any], runs_root: Path, port: int = 0) -> list[str]:
    """`python -m tensorboard.main` over the given runs (else the whole runs root) on 127.0.0.1."""
    import socket

    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    if runs:
        logdir = ["--logdir_spec", ",".join(f"{run.id}:{run.tb_dir.resolve()}" for run in runs)]
    else:
        if not runs_root.is_dir():
            raise fail(f"{runs_root}: no runs directory")
        logdir = ["--logdir", str(runs_root.resolve())]
    return [sys.executable, "-m", "tensorboard.main", *logdir, "--host", "127.0.0.1", "--port", str(port),
            "--reload_interval", "15"]
