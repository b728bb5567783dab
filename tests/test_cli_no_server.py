"""Commands with nothing to run start no Prefect server (each used to pay 20-30 s for one).

``varlide status`` and ``varlide enhance`` of a finished run are run in a fresh interpreter
with no ``PREFECT_API_URL`` (where the CLI would start its temporary server), and three
witnesses say whether a server or a flow was started: ``flows._SERVER`` (our temporary
server), ``prefect`` in ``sys.modules`` (no flow, and no server of Prefect's own, can run
without it) and the interpreter's child processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_rgb
from PIL import Image

from varlide.cli import main

# Runs each argv of sys.argv[1] (JSON) through varlide.cli.main in this one interpreter.
_CALLS = r"""
import contextlib, io, json, sys, time, traceback
import psutil
import flows
from varlide.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException as exc:
            traceback.print_exc()
            rc = f"raised {type(exc).__name__}"
    results.append({
        "argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue(),
        "seconds": time.perf_counter() - started, "server": flows._SERVER is not None,
        "prefect": "prefect" in sys.modules,
        "children": [" ".join(c.cmdline()) for c in psutil.Process().children(recursive=True)],
    })
print("RESULTS " + json.dumps(results))
"""


def run_cli_calls(calls: list[list[str]], tmp_path: Path, env: dict[str, str] | None = None,
                  timeout: float = 300.0) -> list[dict]:
    """Each CLI call's exit code, output, seconds and server witnesses, run in sequence in
    one fresh interpreter (so a server started by any call is seen by that call)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p),
           **(env or {})}
    env.pop("PREFECT_API_URL", None)  # the CLI would start its own temporary server
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, "-c", _CALLS, json.dumps(calls)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


def assert_no_server(result: dict) -> None:
    """No temporary server, no Prefect imported, no server child process."""
    what = f"{result['argv']}: {result['err']}"
    assert not result["server"], f"a temporary Prefect server was started by {what}"
    assert not result["prefect"], f"Prefect was imported (a flow or its server) by {what}"
    servers = [c for c in result["children"] if "prefect" in c or "uvicorn" in c]
    assert not servers, f"server processes {servers} after {what}"


def corpus(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(make_rgb(32, 48, seed=i, scale=0.2)).save(root / f"f{i:03d}.png")
    return root


@pytest.mark.usefixtures("prefect_harness")
def test_finished_run_and_status_start_no_server(tmp_path, mlflow_sqlite, capsys):
    inp, out = corpus(tmp_path / "in", 3), tmp_path / "out"
    args = ["enhance", str(inp), str(out), "--enhancer", "classic-curve", "--metrics",
            "brightness", "--shard-size", "2", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err  # the first run: a flow on the harness
    marker_times = {p.name: p.stat().st_mtime_ns for p in out.glob("runs/*/done/*.json")}
    assert len(marker_times) == 2
    Image.fromarray(make_rgb(32, 48, seed=9)).save(inp / "late.png")  # not part of the run

    rerun, as_json, status = run_cli_calls(
        [args, [*args, "--json"], ["status", str(out)]], tmp_path,
        env={"MLFLOW_TRACKING_URI": mlflow_sqlite})

    assert rerun["rc"] == 0, rerun["err"]
    assert "nothing to do" in rerun["out"] and "3 images, 3 ok" in rerun["out"]
    assert "appeared since" in rerun["out"]  # the late file is reported, not run
    assert_no_server(rerun)
    assert as_json["rc"] == 0, as_json["err"]
    summary = json.loads(as_json["out"])
    assert summary["nothing_to_do"] is True and summary["complete"] is True
    assert summary["metrics"]["images"] == 3
    assert_no_server(as_json)
    assert status["rc"] == 0 and "complete" in status["out"], status["err"]
    assert_no_server(status)
    # nothing recomputed; still one MLflow run for the run id, finished
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("runs/*/done/*.json")} == marker_times
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    runs = client.search_runs([client.get_experiment_by_name("varlide-enhance").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["images"] == 3

