"""Prefect flows: orchestration only (plan shards, map tasks, aggregate, log).

Also the run's temporary Prefect API server (:func:`start_temporary_server`,
:func:`prefect_api`), here because it must be startable before anything heavy is imported.
With no ``PREFECT_API_URL``, Prefect's client would start its own temporary server on first
use, after every import and in the critical path, as a plain child that outlives a process
killed with SIGKILL (the kernel's OOM killer). We start the same command (Prefect's
``SubprocessASGIServer`` command line: uvicorn with ``prefect.server.api.server:create_app``,
UI off, ephemeral services) as early as the CLI can, so it boots while we import and plan, and
point ``PREFECT_API_URL`` at it for the run. The child dies with us: on Linux
``PR_SET_PDEATHSIG`` (SIGKILL when its parent thread ends), and everywhere a watchdog thread in
it that exits when its parent process is gone. Nothing here imports Prefect at module level.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Runs in the server's interpreter before uvicorn: argv = [-c, PARENT_PID, DEATHSIG, *uvicorn]
_CHILD = """\
import os, sys, threading, time
parent, deathsig = int(sys.argv[1]), int(sys.argv[2])
if deathsig and sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, deathsig, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent died before the line above
    os._exit(0)
def _watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=_watch, name="parent-watchdog", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[3:]]
import runpy
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}  # what Prefect's SubprocessASGIServer sets
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """One temporary Prefect API server on 127.0.0.1 that cannot outlive this process."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.started_at = time.perf_counter()
        self.ready_s: float | None = None  # seconds from start to a healthy API
        self.used = False  # a run was pointed at it (so it is not "speculative" any more)
        self._spawn()
        atexit.register(self.stop)  # after Prefect's own exit hooks (LIFO): logs get out

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        self.port = _free_port()
        # PR_SET_PDEATHSIG fires when the forking *thread* ends: only the main thread lives
        # as long as the process; from another thread the watchdog alone protects.
        main = threading.current_thread() is threading.main_thread()
        deathsig = int(getattr(signal, "SIGKILL", 0)) if main else 0
        spec = importlib.util.find_spec("prefect")  # its location, without importing it
        app_dir = os.path.dirname(os.path.dirname(spec.origin))
        cmd = [sys.executable, "-c", _CHILD, str(os.getpid()), str(deathsig),
               "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error",
               "--lifespan", "on"]
        self.process = subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV},
                                        stdin=subprocess.DEVNULL)
        log.info("starting a temporary Prefect server on %s (it stops with this process)",
                 self.api_url)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:  # no proxy: a loopback address, whatever HTTP_PROXY says
            with _NO_PROXY.open(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> str:
        """Block until the API answers; its URL. RuntimeError naming the cause otherwise."""
        self.used = True
        asked = time.perf_counter()
        deadline = asked + timeout
        while self.ready_s is None:
            if self.process is None:
                raise RuntimeError("the temporary Prefect server was stopped")
            code = self.process.poll()
            if code == PORT_IN_USE:  # another process took the port in between: a new one
                self._spawn()
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} "
                                   "(its messages are above)")
            elif self.healthy():
                now = time.perf_counter()
                self.ready_s = now - self.started_at
                log.info("temporary Prefect server ready in %.2f s (waited %.2f s for it)",
                         self.ready_s, now - asked)
            elif time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"the temporary Prefect server did not answer within "
                                   f"{timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT"
                                   "_SECONDS; or set PREFECT_API_URL to a running server)")
            else:
                time.sleep(0.05)
        return self.api_url

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_SERVER: TemporaryServer | None = None
_LOCK = threading.Lock()


def _configured_api() -> tuple[bool, str | None]:
    """(may Prefect start a temporary server, the API URL configured) from Prefect's settings:
    environment, profile, prefect.toml, and any ``temporary_settings`` in effect."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value()), PREFECT_API_URL.value() or None


def _may_need_server() -> bool:
    """Cheap guess before Prefect is imported (reading its settings costs ~1 s of imports):
    only ``PREFECT_API_URL`` in the environment rules a server out; :func:`prefect_api`
    checks the real settings later and stops a server that turns out not to be needed."""
    if os.environ.get("PREFECT_API_URL"):
        return False
    if "prefect.settings" in sys.modules:  # already paid for: ask exactly
        ephemeral, url = _configured_api()
        return ephemeral and url is None and _prefect_own_server() is None
    return True


def start_temporary_server(force: bool = False) -> TemporaryServer | None:
    """Start (once per process) the temporary server if this process may need one (always
    with ``force``); the running one when there is one."""
    global _SERVER
    with _LOCK:
        if _SERVER is not None and _SERVER.alive():
            return _SERVER
        if not force and not _may_need_server():
            return None
        _SERVER = TemporaryServer()
        return _SERVER


def stop_speculative_server() -> None:
    """Stop our server if no run has used it (the settings name another API after all)."""
    global _SERVER
    with _LOCK:
        if _SERVER is not None and not _SERVER.used:
            _SERVER.stop()
            _SERVER = None


def _prefect_own_server() -> str | None:
    """The URL of a temporary server Prefect itself runs in this process (a caller that
    started ``SubprocessASGIServer``), so we reuse it rather than start a second one."""
    if "prefect.server.api.server" not in sys.modules:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    own = SubprocessASGIServer._instances.get(None)
    return own.api_url if own is not None and own.running else None


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """The Prefect API for a flow run started here: the configured one, else our temporary
    server (started now unless :func:`start_temporary_server` ran earlier), set as
    ``PREFECT_API_URL`` for the block, so Prefect's client never starts its own and Dask
    ``local:N`` workers (the flow's settings travel with each task) report to it too."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    ephemeral, url = _configured_api()
    url = url or _prefect_own_server()
    if url or not ephemeral:  # configured (or Prefect's own error for no URL at all)
        stop_speculative_server()
        yield url
        return
    server = start_temporary_server(force=True)
    assert server is not None
    api_url = server.wait_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    updates = {PREFECT_API_URL: api_url}
    if get_current_settings().ui_url is None:  # no UI there: no dead "View at" links
        updates[PREFECT_UI_URL] = ""
    with temporary_settings(updates):
        yield api_url
