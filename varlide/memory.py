"""The memory budget of a run: how much one shard in flight may hold, and what an image costs.

Why: the learned curve path at full resolution costs ~1.4 KB per pixel, so peak memory used
to be image size x batch size x lanes, and 8 frames of 720p (or one 4K frame) killed a
24 GB worker. Now every full-resolution stage is bounded by a *workspace* (the enhancer
runs in row bands, measures in sub-batches), and the engine admits images into the shard's
pipeline (decode-ahead, batches in compute, outputs waiting for their write) only while the
bytes they hold stay inside ``memory_budget``. Peak memory is then the process's fixed part
(torch, models: ~0.75 GB) plus the budget, whatever the frame size.

One place decides each number:
- :func:`default_budget`: half the machine's available memory shared among the shards in
  flight, at most ``DEFAULT_CAP`` (on CPU, throughput stops growing after a few images in
  flight: batching does not pay there, docs/PERFORMANCE.md), at least ``MIN_BUDGET``;
- :func:`workspace_for`: the share of the budget one stage's working tensors may take;
- :func:`image_cost`: the bytes an image holds from decode until its output is written,
  from its size and the stages of the run (a cost model per pixel, measured with
  ``benchmarks/memory.py``; conservative).
"""

from __future__ import annotations

import os
import re

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_CAP = 1 * GiB
MIN_BUDGET = 64 * MiB  # the least a budget may be set to; the default never goes below
MIN_DEFAULT = 256 * MiB
WORKSPACE_SHARE = 0.125  # of the budget, for one stage's working tensors
MAX_WORKSPACE = 64 * MiB  # larger bands are no faster on CPU (measured: 64-256 MB alike)
MIN_WORKSPACE = 16 * MiB

# Bytes per pixel an image holds while it is in a batch: the float32 input and output
# tensors (12 + 12), the uint8 output waiting for its write (3), the prior's luma (4) and
# the short-lived copies around them (~12); a reference adds its own float32 copy. Stage
# working memory (enhancer bands, a measure's call) is the workspace.
BATCH_BYTES_PER_PIXEL = 44
REFERENCE_BYTES_PER_PIXEL = 12

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int | float) -> int:
    """``"2.5GB"``, ``"800M"``, ``"1GiB"``, ``1073741824`` -> bytes (binary units: 1 GB =
    2^30 bytes, as ``free -h`` shows them)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size like 2GB, 800MB or a byte count, got {value!r}")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(nbytes: int | float) -> str:
    return f"{nbytes / GiB:.2f} GB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MB"


def available_memory() -> int:
    """Bytes the kernel says can be allocated now (``MemAvailable``), bounded by this
    process's cgroup limit when one is set; a conservative 4 GB when neither can be read."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    limit = _cgroup_headroom()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found if found is not None else 4 * GiB


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), when one is set."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [ln.strip().split(":", 2) for ln in f if ln.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, rel in lines:
        if controllers == "memory":  # v1
            base = os.path.join("/sys/fs/cgroup/memory", rel.lstrip("/"))
            found = _headroom(base, "memory.limit_in_bytes", "memory.usage_in_bytes")
            if found is not None:
                return found
        elif controllers == "":  # v2 (unified)
            base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
            found = _headroom(base, "memory.max", "memory.current")
            if found is not None:
                return found
    return None


def _headroom(base: str, limit_file: str, usage_file: str) -> int | None:
    try:
        with open(os.path.join(base, limit_file)) as f:
            raw = f.read().strip()
        if raw == "max" or int(raw) >= 1 << 60:  # v1 writes 'no limit' as ~2^63
            return None
        with open(os.path.join(base, usage_file)) as f:
            return max(0, int(raw) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def default_budget(shards_in_flight: int = 1, available: int | None = None) -> int:
    """Per shard in flight: half the available memory shared among them, in
    [``MIN_DEFAULT``, ``DEFAULT_CAP``]."""
    avail = available_memory() if available is None else available
    share = avail // (2 * max(1, shards_in_flight))
    return int(min(DEFAULT_CAP, max(MIN_DEFAULT, share)))


def workspace_for(budget: int) -> int:
    """Bytes one stage's working tensors may take (enhancer bands, a measure's sub-batch)."""
    return int(min(MAX_WORKSPACE, max(MIN_WORKSPACE, budget * WORKSPACE_SHARE)))


def image_cost(height: int, width: int, waiting_bytes: int, reference: bool = False,
               stage_bytes_per_pixel: int = 0, workspace: int = 0) -> int:
    """Bytes an image holds in a batch: its decoded pixels (``waiting_bytes``, uint8 or
    float32), its batch tensors and output, and what a stage that must see the whole image
    at once (a measure: ``stage_bytes_per_pixel``) needs beyond the workspace."""
    pixels = height * width
    per_pixel = BATCH_BYTES_PER_PIXEL + (REFERENCE_BYTES_PER_PIXEL if reference else 0)
    beyond = max(0, pixels * stage_bytes_per_pixel - workspace)
    return int(waiting_bytes + pixels * per_pixel + beyond)
