"""TUI benchmark (not a test): 10,000 runs in the store; first paint, live plot latency, memory.

    .venv/bin/python bench/tui_bench.py [--runs 10000] [--size 160x48] [--keep DIR]

The parent process writes a runs root (one folder per run with run.json and recipe.toml, and
kdtui.json rebuilt from them), then measures in a fresh child process so imports and memory are
those of a real `kdtui` start:
  - first paint: from the child's exec (before any import) and from App start, to the first
    painted row of the runs table (headless Textual at the given size);
  - filter + sort: one keystroke in the filter box over all runs (UI thread);
  - plot latency: a metrics line appended to a run's metrics.jsonl -> the loss plot has painted it
    (median and max of 10);
  - memory: peak RSS of the child (ru_maxrss).
The reference row times Textual's DataTable with the same rows, the widget the table replaces.
Targets (issue 6): first paint < 1 s, plot update < 1 s, memory < 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """[run]\nname = "{name}"\nmethod = "{method}"\n\n[data]\ndataset = "embedded"\nbatch_size = {batch}\n
[model]\narch = "{arch}"\n\n[optim]\nlr = {lr}\n\n[train]\nepochs = {epochs}\nseed = {seed}\n"""
METHODS = ("supervised", "kd", "hsakd", "simclr", "mixmatch")
ARCHS = ("resnet20", "resnet56", "wrn_16_2", "wrn_40_2", "resnet8x4")
STATUSES = ("finished", "finished", "finished", "failed", "interrupted")


def write_runs(root: Path, count: int) -> Path:
    """`count` run folders with plausible run.json/recipe.toml, and one with a long metrics history."""
    root.mkdir(parents=True)
    t0 = time.time() - count * 600
    host = socket.gethostname()
    for i in range(count):
        run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t0 + i * 600))}-run{i:05d}-{i % 65536:04x}"
        path = root / run_id
        path.mkdir()
        epochs = 240 if i % 3 else 100
        status = STATUSES[i % len(STATUSES)]
        done = epochs if status == "finished" else (i * 7) % epochs
        top1 = 0.5 + 0.25 * math.sin(i) ** 2
        info = {"id": run_id, "name": f"run{i:05d}-lr{0.01 * (1 + i % 9):.2f}", "status": status,
                "method": METHODS[i % 5], "arch": ARCHS[i % 5], "dataset": "cifar100", "device": f"cuda:{i % 4}",
                "host": host, "pid": None, "run_dir": str(path), "created": t0 + i * 600,
                "started": t0 + i * 600 + 5, "ended": t0 + i * 600 + 5 + done * 30, "epoch": done, "epochs": epochs,
                "step": done * 391, "steps_per_epoch": 391, "tags": ["ablation"] if i % 7 == 0 else [],
                "note": "", "error": None, "best": {"val.top1": top1, "val.loss": 1.2 - top1, "epoch": done,
                                                   "metric": "val.top1"}, "last": {}}
        (path / "run.json").write_text(json.dumps(info))
        (path / "recipe.toml").write_text(RECIPE.format(name=info["name"], method=info["method"], arch=info["arch"],
                                                        batch=64 * (1 + i % 2), lr=0.01 * (1 + i % 9),
                                                        epochs=epochs, seed=i % 3))
    live = root / sorted(os.listdir(root))[-1]
    events = [{"time": t0, "epoch": 1 + s // 391, "step": s, "split": "train", "kind": "step",
               "loss": 4.6 / (1 + s / 500), "top1": min(0.9, s / 9000), "top5": min(0.99, s / 4000), "lr": 0.05}
              for s in range(20, 6000, 20)]
    (live / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    from tui.store import RunStore

    RunStore(root).rebuild()
    return live


async def measure(root: Path, live: Path, launched: float, size: tuple[int, int]) -> dict[str, float]:
    from textual.widgets import DataTable

    from tui.app import KdtuiApp
    from tui.widgets.format import fmt_duration, fmt_pct, status_of
    from tui.widgets.metric_plot import MetricPlot

    result: dict[str, float] = {"import_s": time.time() - launched}
    start = time.perf_counter()
    start_wall = time.time()
    app = KdtuiApp(root, ROOT / "recipes")
    async with app.run_test(size=size) as pilot:
        while app.runs_screen is None or app.runs_screen.table.first_paint is None:
            await pilot.pause(0.005)
        table = app.runs_screen.table
        result["first_paint_app_s"] = table.first_paint - start
        result["first_paint_process_s"] = start_wall + result["first_paint_app_s"] - launched
        result["rows"] = len(table.rows)
        while app.runs_screen.syncing or not app.runs_screen.loaded:
            await pilot.pause(0.05)
        result["sync_done_s"] = time.perf_counter() - start
        filter_box = app.runs_screen.query_one("#runs-filter")
        began = time.perf_counter()
        filter_box.value = "kd"  # Input.Changed -> filter and sort every run on the UI thread
        await pilot.pause()
        result["filter_sort_ms"] = (time.perf_counter() - began) * 1000
        result["filtered_rows"] = len(table.rows)
        filter_box.value = ""
        await pilot.pause()

        table.cursor = next(i for i, doc in enumerate(table.rows) if doc["id"] == live.name)
        await pilot.press("enter")
        plot = app.screen.query_one("#plot-loss", MetricPlot)
        while plot.painted_points == 0:
            await pilot.pause(0.01)
        latencies = []
        for k in range(10):
            step = 6000 + 20 * k
            event = {"time": time.time(), "epoch": 16, "step": step, "split": "train", "kind": "step", "loss": 0.4}
            written = time.perf_counter()
            with open(live / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(event) + "\n")
            while plot.painted_x < step / 391:
                await pilot.pause(0.005)
            latencies.append(time.perf_counter() - written)
            await pilot.pause(0.1)
        result["plot_latency_median_s"] = statistics.median(latencies)
        result["plot_latency_max_s"] = max(latencies)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # reference: Textual's DataTable holding the same rows (not used by kdtui)
    from textual.app import App

    docs = list(table.rows)

    class Reference(App[None]):
        def compose(self):  # type: ignore[no-untyped-def]
            yield DataTable()

    ref = Reference()
    async with ref.run_test(size=size) as pilot:
        began = time.perf_counter()
        grid = ref.query_one(DataTable)
        grid.add_columns("status", "name", "method", "device", "epoch", "top1", "time", "started")
        grid.add_rows([(status_of(d), d.get("name"), d.get("method"), d.get("device"), f"{d.get('epoch')}",
                        fmt_pct((d.get("best") or {}).get("val.top1")), fmt_duration(None), "")
                       for d in docs])
        await pilot.pause()
        result["datatable_paint_s"] = time.perf_counter() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--size", default="160x48", help="terminal size WxH")
    parser.add_argument("--keep", type=Path, help="write the runs root here and keep it")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "LIVE", "LAUNCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.child:
        root, live, launched = Path(args.child[0]), Path(args.child[1]), float(args.child[2])
        print(json.dumps(asyncio.run(measure(root, live, launched, size))))  # type: ignore[arg-type]
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="kdtui-bench-"))
    try:
        began = time.perf_counter()
        live = write_runs(work / "runs", args.runs)
        print(f"wrote {args.runs:,} runs and kdtui.json in {time.perf_counter() - began:.1f} s ({work / 'runs'})")
        launched = time.time()
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--child", str(work / "runs"),
                              str(live), str(launched)], capture_output=True, text=True, check=True, cwd=work)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("runs in the store", f"{r['rows']:,.0f}", "", ""),
        ("first paint of the runs table, from App start", f"{r['first_paint_app_s']:.3f} s", "< 1 s",
         r["first_paint_app_s"] < 1),
        ("first paint, from process start (imports included)", f"{r['first_paint_process_s']:.3f} s", "", ""),
        ("store reconciled with the run folders (background)", f"{r['sync_done_s']:.3f} s", "", ""),
        (f"filter + sort all runs, one keystroke ({r['filtered_rows']:,.0f} shown)", f"{r['filter_sort_ms']:.1f} ms",
         "", ""),
        ("new metrics line -> painted on the plot (median of 10)", f"{r['plot_latency_median_s']:.3f} s", "< 1 s",
         r["plot_latency_median_s"] < 1),
        ("new metrics line -> painted on the plot (max of 10)", f"{r['plot_latency_max_s']:.3f} s", "< 1 s",
         r["plot_latency_max_s"] < 1),
        ("peak memory (RSS) of the app process", f"{r['peak_rss_mb']:.0f} MB", "< 300 MB", r["peak_rss_mb"] < 300),
        ("reference: Textual DataTable, same rows, to paint", f"{r['datatable_paint_s']:.3f} s", "", ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"\nkdtui TUI bench: {args.runs:,} runs, headless {args.size}, {os.cpu_count()} CPUs")
    print(f"{'measure':<{width}}  {'value':>10}  {'target':>8}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>10}  {target:>8}  {'' if ok == '' else ('yes' if ok else 'NO')}")


if __name__ == "__main__":
    main()
