"""Scaling of the main job on Dask: 1 worker process vs 2 on this machine, and the per-shard
orchestration overhead at the default shard size.

    .venv/bin/python benchmarks/dask_scaling.py [--images N] [--size WxH] [--shard-size S]
                                                [--workers 1,2] [--workdir DIR]

What it does, in one process:

1. builds a demo corpus of N low-light images (``varlide.demo.make_demo_corpus``; every 5th
   image 256x256, the rest ``--size``), kept in the work folder for the next run;
2. starts Prefect's temporary server once (outside the timings) and runs every flow with its
   URL set, so the Dask workers report to it;
3. for each worker count W: starts a ``distributed.LocalCluster`` of W worker processes x 1
   thread on 127.0.0.1 (outside the timing: a deployment keeps its cluster), builds the
   stages in every worker (``torch_threads`` 1, the per-process model cache) and warms each
   worker's Prefect client with a small flow run, then times ONE ``run_enhance`` of the corpus
   with ``dask=<scheduler address>``, default config otherwise (progress off, MLflow in a
   temporary SQLite file);
4. checks both runs gave the same rows (count, statuses, the v/b and quality values exactly);
5. prints, per W: images/s over the flow's wall time (planning, shards, Parquet, markers,
   MLflow recording all inside), and the per-shard orchestration overhead:

       wall per shard   = T x W / S      (T: the flow's shard phase, ``session.seconds``;
                                          S shards, W workers each running S/W in a row)
       engine per shard = mean of the done markers' ``seconds`` (process_shard's own time)
       overhead         = (wall per shard - engine per shard) / wall per shard

   i.e. the share of the workers' time not spent in the engine: Prefect task runs and
   states, Dask scheduling and transfers, the flow's bookkeeping, and a tail when S is not a
   multiple of W (keep N a multiple of W x S). Goal: <= 5 % at the default shard size;
6. prints the scaling ratio images/s(W max) / images/s(W = 1) LAST.

The machine's load average is printed: on a shared machine the ratio measures what the
other jobs left free too. Only torch at module level, per DESIGN.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (
    cores,
    cpu_model,
    load_average,
)  # noqa: E402
from benchmarks._common import (
    say as _say,
)
from benchmarks._common import (
    setup_env as _setup_env,
)
from benchmarks._common import (
    size_arg as _size,
)

METRIC_COLUMNS = ("visibility", "blur", "n_iter", "route", "status")








def machine() -> str:
    return (f"{cpu_model()}, {cores()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}")




def corpus(workdir: Path, images: int, size: tuple[int, int]) -> Path:
    """The demo corpus's lowlight folder (made once per images/size in the work folder)."""
    from varlide.demo import make_demo_corpus

    root = workdir / f"demo-{images}-{size[0]}x{size[1]}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        make_demo_corpus(str(root), count=images, size=size, seed=0)
        done.write_text("ok")
        _say(f"corpus: {images} images made in {time.perf_counter() - t:.1f}s ({root})")
    return root / "lowlight"


def start_prefect_server() -> str:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses in ephemeral mode
    t = time.perf_counter()
    server.start()
    _say(f"prefect: temporary server started in {time.perf_counter() - t:.1f}s")
    return server.api_url


def _build_stages(config: dict[str, Any]) -> str:
    """On a worker: torch threads, then the run's models and measures (cached per process)."""
    from varlide.config import Config
    from varlide.engine import get_stages, set_torch_threads, worker_name

    cfg = Config(**config)
    set_torch_threads(cfg.torch_threads)
    get_stages(cfg)
    return f"{worker_name()} torch_threads={torch.get_num_threads()}"


def run_on_cluster(workers: int, inp: Path, workdir: Path, cfg_fields: dict[str, Any]
                   ) -> dict[str, Any]:
    import distributed

    from flows.enhance import run_enhance
    from varlide.config import Config
    from varlide.storage.runstore import RunStore

    t = time.perf_counter()
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as lc:
        with distributed.Client(lc, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=300)
            # a run id per W: each timed run is a new run (and MLflow run), not a resume
            cfg = Config(**cfg_fields, dask=lc.scheduler_address,
                         run_id=f"dask-scaling-w{workers}")
            ready = client.run(_build_stages, cfg.model_dump(mode="json"))
            _say(f"W={workers}: cluster up and stages built in {time.perf_counter() - t:.1f}s: "
                 + ", ".join(sorted(ready.values())))
            warm_in = workdir / f"warm-in-{workers}"
            if not warm_in.exists():  # a few images, one per shard: each worker gets some
                warm_in.mkdir(parents=True)
                for p in sorted(inp.iterdir())[:4 * workers]:
                    shutil.copy(p, warm_in / p.name)
            out_warm = workdir / f"warm-out-{workers}"
            shutil.rmtree(out_warm, ignore_errors=True)
            run_enhance(str(warm_in), str(out_warm),
                        cfg.model_copy(update={"shard_size": 1, "run_id": None}))

            out = workdir / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            summary = run_enhance(str(inp), str(out), cfg)
            wall = time.perf_counter() - t
    if summary["failed_shards"] or not summary["complete"]:
        raise SystemExit(f"W={workers}: run incomplete: {summary['failed_shards']}")
    markers = RunStore(str(out), summary["run_id"]).read_markers()
    engine = [float(m["seconds"]) for m in markers.values()]
    shards = len(engine)
    phase = float(summary["session"]["seconds"])
    wall_per_shard = phase * workers / shards
    engine_per_shard = sum(engine) / shards
    images = int(summary["metrics"]["images"])
    return {
        "workers": workers, "images": images, "shards": shards, "wall": wall, "phase": phase,
        "images_per_s": images / wall, "wall_per_shard": wall_per_shard,
        "engine_per_shard": engine_per_shard,
        "overhead": (wall_per_shard - engine_per_shard) / wall_per_shard,
        "worker_names": sorted({m["worker"] for m in markers.values()}), "out": out,
        "run_id": summary["run_id"],
    }


def same_rows(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    import pandas as pd

    da, db = (pd.read_parquet(r["out"] / "scores").sort_values("rel_path", ignore_index=True)
              for r in (a, b))
    if len(da) != len(db) or list(da["rel_path"]) != list(db["rel_path"]):
        return [f"rows differ: {len(da)} vs {len(db)}"]
    cols = [c for c in da.columns if c in METRIC_COLUMNS or c.startswith("q_")]
    return [c for c in cols if not da[c].equals(db[c])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024,
                   help="corpus size (default 1024: 4 shards of the default 256)")
    p.add_argument("--size", type=_size, default=(320, 240), help="WxH (default 320x240)")
    p.add_argument("--shard-size", type=int, default=None, help="default: Config's (256)")
    p.add_argument("--enhancer", default=None,
                   help="enhancer of the timed runs (default: Config's, varlide-lite with "
                   "its shipped weights; the issue-2 figures pinned classic-curve)")
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="work folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="varlide-dask-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _setup_env(workdir)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from varlide.config import Config

    shard_size = args.shard_size or Config().shard_size
    args.enhancer = args.enhancer or Config().enhancer
    cfg_fields = {"shard_size": shard_size, "torch_threads": 1, "progress": False,
                  "retry_delay_s": 0, "device": "cpu", "enhancer": args.enhancer}
    _say(f"machine: {machine()}; load average {load_average()}")
    _say(f"config: default stages (prior {Config().prior}, enhancer {args.enhancer}, "
         f"metrics {','.join(Config().metrics)}), shard_size {shard_size}, torch_threads 1, "
         f"1 thread per worker; {args.images} images of {args.size[0]}x{args.size[1]}")
    inp = corpus(workdir, args.images, args.size)
    api_url = start_prefect_server()
    results = []
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            for w in counts:
                r = run_on_cluster(w, inp, workdir, cfg_fields)
                results.append(r)
                _say(f"W={w}: {r['images']} images, {r['shards']} shards on "
                     f"{len(r['worker_names'])} worker process(es): {r['wall']:.1f}s wall, "
                     f"{r['images_per_s']:.2f} images/s; load average {load_average()}")
        problems = same_rows(results[0], results[-1]) if len(results) > 1 else []
        if problems:
            _say(f"CHECK FAILED: rows differ between W={counts[0]} and W={counts[-1]}: "
                 f"{problems}")
            return 1
        _say("check: same rows and values for every worker count")
        for r in results:
            _say(f"W={r['workers']}: per shard {r['wall_per_shard']:.2f}s wall "
                 f"({r['phase']:.1f}s shard phase x {r['workers']} / {r['shards']}), "
                 f"{r['engine_per_shard']:.2f}s engine -> orchestration overhead "
                 f"{100 * r['overhead']:.1f}% (goal <= 5%)")
        _say(json.dumps([{k: v for k, v in r.items() if k != "out"} for r in results],
                        default=str))
        base, top = results[0], results[-1]
        _say(f"ratio images/s W={top['workers']} / W={base['workers']}: "
             f"{top['images_per_s'] / base['images_per_s']:.2f}x")
        return 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
