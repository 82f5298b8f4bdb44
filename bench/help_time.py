"""Benchmark 4: `kdtui --help` wall time vs `python -c "import typer"`.

    .venv/bin/python bench/help_time.py [--reps 21]

Both are fresh processes of the same interpreter, run alternately (A B B A ...); the ratio is the
median of per-round ratios. `kdtui` is the installed console script when there is one, else the
same entry point (`tui.cli:main`) started the way the console script starts it. Target: <= 1.5.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, Row, header, interleave, median, paired_ratio, print_table

ENTRY = "import sys; from tui.cli import main; sys.argv[0] = 'kdtui'; sys.exit(main())"


def kdtui_command() -> tuple[list[str], str]:
    script = Path(sys.executable).with_name("kdtui")
    if script.exists() or shutil.which("kdtui"):
        return [str(script) if script.exists() else "kdtui", "--help"], "console script"
    return [sys.executable, "-c", ENTRY, "--help"], "tui.cli:main via python -c"


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run(reps: int = 21) -> list[Row]:
    kdtui, how = kdtui_command()
    typer = [sys.executable, "-c", "import typer"]
    got = interleave({"kdtui": lambda: wall(kdtui), "typer": lambda: wall(typer)}, reps, warmup=2)
    return [Row("4 --help time", "kdtui --help vs import typer", median(got["kdtui"]) * 1000,
                median(got["typer"]) * 1000, "ms", "<= 1.5", f"{reps} rounds, {how}",
                ratio=paired_ratio(got["kdtui"], got["typer"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    print(header("bench 4: kdtui --help time"))
    print_table(run(args.reps))


if __name__ == "__main__":
    main()
