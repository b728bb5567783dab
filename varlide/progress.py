"""Progress of a run in this process: a thread-safe counter with an optional terminal bar.

The engine reports each finished batch through a callback; the CLI shows a bar with images
done, errors and images/s. A reporter is looked up by run id so orchestration code (a
Prefect task) can hand the callback to the engine without knowing about the bar.
"""

from __future__ import annotations

import threading
import time

_REPORTERS: dict[str, Progress] = {}
_LOCK = threading.Lock()


class Progress:
    def __init__(self, total: int, done: int = 0, show_bar: bool = True, desc: str = "images"):
        self.total, self.done, self.errors = total, done, 0
        self.processed = 0  # images processed by this process (for images/s)
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._bar = None
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=desc, unit="img", smoothing=0.1,
                             dynamic_ncols=True)

    def update(self, images: int, errors: int = 0) -> None:
        with self._lock:
            self.done += images
            self.processed += images
            self.errors += errors
            if self._bar is not None:
                self._bar.set_postfix(errors=self.errors, refresh=False)
                self._bar.update(images)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def register(run_id: str, progress: Progress) -> None:
    with _LOCK:
        _REPORTERS[run_id] = progress


def unregister(run_id: str) -> None:
    with _LOCK:
        _REPORTERS.pop(run_id, None)


def reporter(run_id: str) -> Progress | None:
    with _LOCK:
        return _REPORTERS.get(run_id)
