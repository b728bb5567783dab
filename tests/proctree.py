"""Process-tree checks shared by the tests and benchmarks/soak.py: what a command left
running (psutil)."""

from __future__ import annotations

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every child of ``pid``, recursively (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
