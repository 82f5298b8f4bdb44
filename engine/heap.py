"""Keep freed heap memory for reuse (glibc), so CPU batches do not page-fault in afresh.

glibc hands memory at the top of the heap back to the OS once more than its trim threshold is free
(by default twice the largest recent block: about 3 MB for CIFAR batches of 128), and the next
batch's buffers then page-fault in again. On our 2-core VM that was 1,600-2,200 page faults per
SimCLR two-view batch, about 40% of its time (bench/README.md). A top pad keeps up to `pad_bytes`
of freed memory for reuse, the remedy PyTorch's CPU tuning guide gets from jemalloc or tcmalloc,
without a preload. Linux + glibc only; elsewhere (macOS, musl) a no-op that returns False.
"""

from __future__ import annotations

import ctypes
import sys

M_TOP_PAD = -2  # glibc malloc.h: extra memory to take on each heap growth and to keep on each trim
M_MMAP_THRESHOLD = -3  # blocks at least this large get their own mmap, returned to the OS on free


def keep_freed_heap(pad_bytes: int = 64 << 20, mmap_bytes: int = 32 << 20) -> bool:
    """Ask glibc to keep `pad_bytes` of freed memory at the top of each heap, and to serve blocks
    under `mmap_bytes` (glibc's ceiling) from the heap; True if both took. Setting either freezes
    glibc's self-raising mmap threshold, so both are set: with the pad alone, blocks over 128 KB
    would keep their own mmap and fault in on every allocation. Larger blocks (datasets) still get
    their own mmap and go back to the OS when freed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_bytes) == 1 and mallopt(M_TOP_PAD, pad_bytes) == 1
