"""glibc malloc settings for a worker process: reuse freed frame-sized buffers, do not remap.

Why: a shard allocates and frees tens of MB per image (decoded frames, band tensors, the
measures' temporaries). With glibc's defaults, blocks above a sliding threshold (up to
32 MB) are ``mmap``-ed and unmapped on free, every other thread gets its own arena whose
64 MB heaps cannot hold a frame (so those blocks are mapped too), and freed heap tops are
trimmed: each new buffer is fresh pages, one page fault per 4 KB. Measured on the default
job, 16 x 1920x1080 JPEG on 2 cores: system time 4.8 s against 10.9 s user (2.7 M minor
faults); with one arena, a fixed 32 MB mmap threshold and no trimming: 1.1 s against
10.2 s (0.66 M), 38 % faster, and a lower peak RSS (docs/PERFORMANCE.md).

``tune()`` applies the three settings through ``mallopt``. The arena limit only takes
effect before the process's second thread exists (glibc fixes it when it first creates
one), so ``varlide.cli.main`` calls it first thing; worker processes we start get the same
settings through :data:`ENV` (glibc reads them at start-up). ``VARLIDE_MALLOC=system``
leaves glibc's defaults. Elsewhere (not Linux/glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20  # glibc's maximum; larger blocks are mapped whatever we ask
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GB of freed heap top for reuse
ARENAS = 1
ENV = {
    "MALLOC_ARENA_MAX": str(ARENAS),
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
_DONE = False


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("VARLIDE_MALLOC") != "system"


def tune() -> bool:
    """Apply the settings once per process; True when glibc accepted them."""
    global _DONE
    if _DONE or not enabled():
        return _DONE
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, or no libc to load: nothing to tune
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    _DONE = ok
    return ok


def worker_env() -> dict[str, str]:
    """Environment for a worker process we start (Dask ``local:N``): the same settings."""
    return dict(ENV) if enabled() else {}
