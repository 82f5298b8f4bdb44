"""A preloaded engine launcher for the kill tests: `python tests/reliability/forkserver.py`.

Starting `python -m engine` costs about 3 s of CPU here before the first step (importing torch,
and torch.use_deterministic_algorithms importing torch._inductor). Twenty kills would spend a
minute on imports alone, so this process pays for them once and then forks one engine process per
request. Each child is a real, separate process running the real entry point
(`engine.__main__.main`) in its own session, with stdout/stderr in the run's train.log; the tests
SIGKILL it like any other process. The slow variant of the kill test uses fresh `python -m engine`
processes instead.

Protocol, one JSON object per line. Request on stdin: {"args": [...], "env": {...}, "log": path}.
Replies on stdout: {"pid": N} once the child runs, then {"pid": N, "exit": code} once it has been
reaped (negative: killed by that signal). Children run one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

torch.set_num_threads(1)  # no OpenMP pool exists before fork (children would inherit a broken one)
torch.use_deterministic_algorithms(True, warn_only=True)  # the expensive import, done once
torch.use_deterministic_algorithms(False)

import engine.trainer  # noqa: E402,F401  (tensorboard, models, methods: imported once)
from engine.__main__ import main as engine_main  # noqa: E402


def child(request: dict) -> int:
    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(request.get("env") or {})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        return engine_main(request["args"])
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
