"""engine.heap.keep_freed_heap: batch-sized buffers are reused instead of page-faulting in again."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Six CIFAR-batch-sized buffers made and freed per cycle, as one SimCLR view does; prints the minor
# page faults of each cycle. "default" freezes glibc at its documented defaults (mmap threshold
# 128 KB, and no self-raising), where every cycle faults its buffers in afresh.
PATTERN = """
import ctypes, resource, sys, torch
from engine.heap import keep_freed_heap
if sys.argv[1] == "kept":
    assert keep_freed_heap()
else:
    assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.empty(128 * 3 * 32 * 32).fill_(1.0) for _ in range(6)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[5:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_stops_page_faults_in_the_steady_state() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PATTERN, mode], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=120)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("kept")
    assert default > 5 * 1000  # 9 MB of fresh pages per cycle, 5 cycles
    assert kept < 50, (kept, default)
