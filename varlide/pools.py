"""Thread pools whose stuck work can be left behind: the engine's per-image and per-batch
timeouts.

A Python thread cannot be killed, so a decode or a stage that hangs keeps its thread. What a
timeout can do is stop *waiting*: the task's caller records an error row, the pool is marked
``abandon``-ed, its queued (not yet started) tasks move to fresh threads, and the shard goes
on. The stuck thread finishes (or not) on its own; its result is dropped. ``stuck_threads``
counts such threads still alive, so the CLI can exit without joining them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_abandoned: list[str] = []  # thread-name prefixes of abandoned pools
_abandoned_lock = threading.Lock()
_pool_ids = itertools.count()


class TaskTimeout(TimeoutError):
    """A task ran longer than its limit; its thread was left behind."""


class Task(Generic[T]):
    """One submitted call: its future (replaced when the task moves pools) and the moment a
    thread started it (None while it waits in a queue, so queue time never counts)."""

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.started: float | None = None
        self.future: Future[T] = Future()

    def run(self) -> T:
        self.started = time.monotonic()
        return self.fn(*self.args)

    def result(self, limit_s: float | None = None, poll_s: float = 0.25,
               on_wait: Callable[[], None] | None = None) -> T:
        """The task's value; ``TaskTimeout`` once it has *run* longer than ``limit_s``.
        ``on_wait`` is called between polls (a stop request raises from there)."""
        while True:
            future = self.future
            try:
                return future.result(timeout=poll_s)
            except FutureTimeout:
                pass
            except CancelledError:
                if future is self.future:  # cancelled for good, not moved to a new pool
                    raise
                continue
            if on_wait is not None:
                on_wait()
            if (limit_s is not None and self.started is not None
                    and time.monotonic() - self.started > limit_s):
                raise TaskTimeout(f"took longer than {limit_s:g} s")


class Pool:
    """``submit`` tasks to ``threads`` threads; ``abandon`` leaves the current threads to
    their stuck work and carries every queued task to new ones. Driven from one thread
    (the shard's main loop): it alone submits, waits and abandons."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = threads, name
        self._executor, self._prefix = self._new_executor()
        self._queued: list[Task] = []
        self.abandoned = 0

    def _new_executor(self) -> tuple[ThreadPoolExecutor, str]:
        prefix = f"{self.name}-{next(_pool_ids)}"
        return ThreadPoolExecutor(self.threads, thread_name_prefix=prefix), prefix

    def submit(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        task: Task[T] = Task(fn, args)
        self._start(task)
        return task

    def _start(self, task: Task) -> None:
        task.future = self._executor.submit(task.run)
        self._queued = [t for t in self._queued if t.started is None and not t.future.done()]
        self._queued.append(task)

    def abandon(self) -> None:
        """Leave the current threads (one of them is stuck) and move what has not started."""
        old, old_prefix = self._executor, self._prefix
        self._executor, self._prefix = self._new_executor()
        self.abandoned += 1
        waiting, self._queued = self._queued, []
        for task in waiting:
            old_future = task.future
            if task.started is None and old_future.cancel():
                self._start(task)
        old.shutdown(wait=False)
        with _abandoned_lock:
            _abandoned.append(old_prefix + "_")

    def shutdown(self) -> None:
        """Wait for the live threads; abandoned ones are not waited for."""
        self._executor.shutdown(wait=True)


def stuck_threads() -> int:
    """Threads of abandoned pools still running (their work hung past a timeout)."""
    with _abandoned_lock:
        prefixes = tuple(_abandoned)
        alive = sum(t.name.startswith(prefixes) for t in threading.enumerate()) if prefixes else 0
        if not alive:
            _abandoned.clear()
        return alive


class Inline:
    """The one-lane case without a timeout: ``submit`` runs the call here and now."""

    def submit(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        task: Task[T] = Task(fn, args)
        try:
            task.future.set_result(task.run())
        except BaseException as exc:  # re-raised by task.result(), as from a pool
            task.future.set_exception(exc)
        return task

    def shutdown(self) -> None:
        pass
