"""Start-up: seconds from `varlide enhance DIR OUT` to the first enhanced image, and why.

    .venv/bin/python benchmarks/startup.py              # ~1.5 min on 2 cores
    .venv/bin/python benchmarks/startup.py --keep /tmp/startup-bench

A corpus of 4 small PNGs (``varlide demo-corpus DIR --count 4``), an isolated PREFECT_HOME
and a SQLite MLflow store (``MLFLOW_TRACKING_URI=sqlite:///...``, as the Makefile's demo) in
a work folder. Every figure is a fresh process, one at a time, standard library here:

  end to end, cold    first run of a new user: Prefect's database is created (migrations) and
                      so is MLflow's; the first image is the first file under OUT/enhanced
  end to end, warm    the same command again on a new OUT (both stores exist)
  imports             what the warm command imported, from ``-X importtime`` of one more
                      run: the cumulative seconds of each heavy package where it was first
                      imported (— = not imported by this command)
  prefect server      our temporary server alone (flows.TemporaryServer), cold then warm
  stages              ``varlide.engine`` import, then ``get_stages`` of the default config
  mlflow run          ``RunTracker`` (mlflow import, store creation, experiment, run), on a
                      new store and on the existing one; a run does this after its shards

The last line is the warm time to first image against the goal (<= 15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 15.0
HEAVY = ("torch", "torchvision", "prefect", "prefect.server.api.server", "prefect_dask",
         "distributed", "mlflow", "pyiqa", "open_clip", "pandas", "pyarrow", "fsspec",
         "pydantic", "flows.enhance", "varlide.engine", "varlide.run")

STAGES = """
import json, time
t0 = time.perf_counter()
from varlide.config import Config
from varlide.engine import get_stages
t1 = time.perf_counter()
get_stages(Config(progress=False))
print(json.dumps({"import_s": t1 - t0, "build_s": time.perf_counter() - t1}))
"""
MLFLOW = """
import json, time
t0 = time.perf_counter()
from varlide.tracking import RunTracker
t1 = time.perf_counter()
tracker = RunTracker("startup-bench", "bench-run")
tracker.finish(True)
print(json.dumps({"import_s": t1 - t0, "run_s": time.perf_counter() - t1}))
"""
SERVER = """
import json, logging, time
from flows import TemporaryServer
server = TemporaryServer()
server.wait_ready(300)
print(json.dumps({"ready_s": server.ready_s}))
server.stop()
"""


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def env_for(work: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "prefect-home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    return env


def python_json(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(corpus: Path, out: Path, env: dict[str, str],
               importtime: bool = False) -> dict:
    """Run the command; seconds to the first enhanced file and to exit, and its log."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m",
           "varlide.cli", "-v", "enhance", str(corpus), str(out), "--no-progress"]
    err_path = out.parent / f"{out.name}.stderr"
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        first = None
        while proc.poll() is None:
            if first is None and any(p.is_file() for p in (out / "enhanced").rglob("*")):
                first = time.perf_counter() - t0
            time.sleep(0.02)
    total = time.perf_counter() - t0
    log = err_path.read_text()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log[-3000:]}")
    ready = re.search(r"server ready in ([\d.]+) s \(waited ([\d.]+) s", log)
    return {"first_image_s": first, "total_s": total, "log": log,
            "server_ready_s": float(ready.group(1)) if ready else None,
            "server_waited_s": float(ready.group(2)) if ready else None}


def import_profile(log: str) -> dict[str, tuple[float, str]]:
    """Each HEAVY module at its first import (``-X importtime``): cumulative seconds, and
    the module that imported it (the next line printed one level up)."""
    lines = [(len(m.group(2)) // 2, m.group(3), int(m.group(1)) / 1e6) for m in re.finditer(
        r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", log)]
    found: dict[str, tuple[float, str]] = {}
    for i, (depth, name, cum) in enumerate(lines):
        if name in HEAVY and name not in found:
            parent = None
            for d, n, _ in lines[i + 1:]:  # the enclosing imports, innermost first
                if d < depth:
                    depth = d
                    if not n.startswith(name + "."):
                        parent = n
                        break
                if d == 0:
                    break
            found[name] = (cum, f"imported by {parent}" if parent
                           else "imported at run time, by a function")
    return found


def row(name: str, seconds: float | None, note: str = "") -> None:
    value = "—" if seconds is None else f"{seconds:6.2f} s"
    print(f"  {name:34} {value:>9}  {note}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="work folder to use and keep (default: a "
                    "temporary one, removed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="varlide-startup-"))
    if work.exists() and args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = env_for(work)
    try:
        print(f"machine: {os.cpu_count()} cores; load average {load()}; work {work}")
        subprocess.run([sys.executable, "-m", "varlide.cli", "demo-corpus", str(work / "d"),
                        "--count", "4"], env=env, check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        corpus = work / "d" / "lowlight"
        cold = end_to_end(corpus, work / "out-cold", env)
        warm = end_to_end(corpus, work / "out-warm", env)
        print(f"end to end (load after: {load()})")
        for name, r in (("cold", cold), ("warm", warm)):
            row(f"{name}: command -> first image", r["first_image_s"])
            row(f"{name}: command -> exit", r["total_s"])
            row(f"{name}: server ready after start", r["server_ready_s"],
                f"the CLI waited {r['server_waited_s']:.2f} s for it"
                if r["server_waited_s"] is not None else "")
        prof = import_profile(end_to_end(corpus, work / "out-imports", env, True)["log"])
        print("imports of the warm command (-X importtime; cumulative at first import)")
        for name in HEAVY:
            seconds, by = prof.get(name, (None, ""))
            row(name, seconds, by)
        fresh = {**env, "PREFECT_HOME": str(work / "prefect-home-2"),
                 "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow-2.db'}"}
        print("components, each alone in a fresh process")
        row("prefect server, new database", python_json(SERVER, fresh)["ready_s"],
            "migrations: once per PREFECT_HOME")
        row("prefect server, existing database", python_json(SERVER, fresh)["ready_s"])
        stages = python_json(STAGES, env)
        row("import varlide.engine (torch ...)", stages["import_s"])
        row("get_stages(default config)", stages["build_s"], "enhancer, prior, measures")
        new, again = python_json(MLFLOW, fresh), python_json(MLFLOW, fresh)
        row("import varlide.tracking", new["import_s"], "mlflow itself is imported lazily")
        row("mlflow run, new store", new["run_s"], "mlflow import + tables + experiment")
        row("mlflow run, existing store", again["run_s"])
        print(f"load average after: {load()}")
        print(f"first image, warm: {warm['first_image_s']:.2f} s; cold: "
              f"{cold['first_image_s']:.2f} s; goal <= {GOAL_S:.0f} s: warm ratio "
              f"{warm['first_image_s'] / GOAL_S:.2f}, cold ratio "
              f"{cold['first_image_s'] / GOAL_S:.2f} (<= 1 meets it)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
