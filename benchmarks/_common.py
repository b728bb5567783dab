"""Helpers every benchmark shares. Imports only the standard library and torch at module
level, so the GPU benchmarks that use it still run on a bare machine with ``PYTHONPATH=.``."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def size_arg(text: str) -> tuple[int, int]:
    """argparse type of ``WIDTHxHEIGHT``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"size too small: {text!r}")
    return w, h


def setup_env(workdir: Path) -> None:
    """Environment of a benchmark process; must run before Prefect or MLflow is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))  # isolated state
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int,
                   warmup: int) -> float:
    """Median seconds per call of 3 repeats of ``iters`` calls, after ``warmup`` calls; CUDA
    events on a GPU, wall clock on CPU."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        runs = []
        for _ in range(3):
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end) / 1000 / iters)
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    fn()
                runs.append((time.perf_counter() - t) / iters)
    return statistics.median(runs)


def own_peak_rss() -> int:
    """This process's own peak RSS in bytes (``VmHWM``). Not ``ru_maxrss``: Linux carries
    that across ``fork`` + ``exec``, so a child started by a big parent reports the
    parent's size; ``VmHWM`` belongs to the new address space. Falls back to ``ru_maxrss``
    where ``/proc`` is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across filesystems). Not a symlink: the
    listing does not follow symlinks that leave the input root."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
