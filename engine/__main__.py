"""`python -m engine RUN_DIR [--resume]`: train the recipe in a prepared run directory.

The launcher (tui/launcher.py) creates the run directory and starts this process;
nothing else talks to it but through that directory and its pid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    parser.add_argument("run_dir", help="a run directory holding recipe.toml")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt")
    args = parser.parse_args(argv)

    from engine.checkpoint import CheckpointError
    from engine.recipe import RecipeError
    from engine.trainer import train

    try:
        return train(args.run_dir, resume=args.resume)
    except (RecipeError, CheckpointError) as err:
        from engine.rundir import RunDir

        RunDir(Path(args.run_dir)).update_info(status="failed", error=str(err))
        print(f"kdtui: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
