"""Start-up of `varlide enhance`: its temporary Prefect server (and Dask workers) die with it.

The kernel's OOM killer ends a process with SIGKILL: no ``atexit``, no ``finally``. Before,
the run's temporary Prefect server (a plain child) then stayed up as an orphan. Here a real
``varlide enhance`` runs in a subprocess on loopback; once its server answers, the varlide
process is SIGKILLed and every process it had spawned must be gone within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import make_rgb
from PIL import Image
from proctree import alive as _alive

GONE_WITHIN_S = 5.0
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc: Linux only")


def _corpus(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(make_rgb(96, 128, seed=i, scale=0.2)).save(root / f"f{i:03d}.png")
    return root


def _server_child(proc: psutil.Process) -> psutil.Process | None:
    """The uvicorn child serving Prefect's app, once it listens on a port."""
    for child in proc.children(recursive=True):
        try:
            if ("prefect.server.api.server:create_app" in " ".join(child.cmdline())
                    and any(c.status == psutil.CONN_LISTEN for c in child.net_connections())):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    # enough images that the run is still going when the server is up
    inp = _corpus(tmp_path / "in", 48)
    return subprocess.Popen(
        [sys.executable, "-m", "varlide.cli", "enhance", str(inp), str(tmp_path / "out"),
         "--no-progress", "--batch-size", "1", *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_server(proc: subprocess.Popen, timeout: float = 240.0) -> psutil.Process:
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"varlide exited early with code {proc.returncode}"
        server = _server_child(ps)
        if server is not None:
            return server
        time.sleep(0.1)
    raise AssertionError(f"no listening Prefect server child within {timeout:.0f} s")




def _wait_for_dask_worker(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    ps = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"varlide exited early with code {proc.returncode}"
        if any("spawn_main" in " ".join(c.cmdline()) for c in ps.children(recursive=True)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no Dask worker process within {timeout:.0f} s")


@pytest.mark.parametrize("runner", [(), ("--dask", "local:1")], ids=["threads", "dask-local"])
def test_sigkilled_run_leaves_no_process_behind(tmp_path, runner):
    proc = _start(tmp_path, *runner)
    tree: list[psutil.Process] = []
    try:
        server = _wait_for_server(proc)
        if runner:
            _wait_for_dask_worker(proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert server in tree
        os.kill(proc.pid, signal.SIGKILL)  # what the OOM killer sends
        proc.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(tree)
        assert not left, f"still alive after SIGKILL of varlide: {[p.cmdline() for p in left]}"
    finally:
        if proc.poll() is None:
            tree += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait()
        for p in _alive(tree):  # a failed assertion must not leave them behind either
            p.kill()
