"""Throughput of the main job against a naive sequential script, and its memory growth.

    .venv/bin/python benchmarks/pipeline.py [--images N] [--size WxH] [--repeats R]
                                            [--skip-memory] [--memory-factor K] [--workdir DIR]

(``make bench`` runs it with the defaults.) What it does, all in one process run:

1. builds a demo corpus of N low-light images plus their clean references
   (``varlide.demo.make_demo_corpus``: every 5th image is 256x256, the rest ``--size``);
2. starts Prefect's temporary server (timed on its own), then warms up: one flow run on 2
   other images (imports pyiqa, builds the stages, creates the MLflow SQLite store);
3. repeats R times, alternating which goes first: OUR flow (``flows.enhance.run_enhance``
   with the default ``Config``, ``--reference`` given, progress off, MLflow in a temporary
   SQLite file) and a NAIVE research script (``naive_pipeline`` below: PIL decode one image
   at a time, the same registries and measures, ``Image.save(path)`` with PIL defaults, one
   CSV, default torch threads), each into a fresh output folder;
4. checks that both give the same rows (count, statuses, values of a few columns within a
   tolerance, pixels of a few enhanced images) - a failed check exits non-zero;
5. prints images/s of each, a per-stage breakdown and, unless ``--skip-memory``, the peak
   RSS of our flow on 1x and K x the corpus (one subprocess each);
6. prints the ratio ours / naive LAST.

Timing: "flow" is the wall time of one ``run_enhance`` call with the Prefect server already
up and the process warm (models built, pyiqa imported): planning, the shard task, Parquet,
marker and MLflow recording are all inside it. The ratio uses it, because the temporary
server's start is a fixed cost per process (a deployment keeps its server), not per image;
the total with the server start is printed too. The naive script's model construction is
likewise outside its timing. The figures go in docs/PERFORMANCE.md.

Only torch (and numpy) at module level, per DESIGN.md; Prefect, MLflow and pyiqa are
imported where they are used.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (
    cores,
    cpu_model,
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

DEFAULT_THREADS = torch.get_num_threads()  # what a plain script gets (the naive baseline)
STAGES = ("decode", "prior", "enhance", "quality", "encode/write", "other")
# Columns compared between ours (Parquet) and naive (CSV): (column, rtol, atol).
CHECKS = (
    ("visibility", 1e-5, 1e-6),  # float32 in the Parquet
    ("blur", 1e-5, 1e-6),
    ("n_iter", 0.0, 0.0),
    ("q_brightness_in", 1e-6, 1e-9),
    ("q_brightness_out", 1e-6, 1e-9),
    ("q_sharpness_out", 1e-5, 1e-6),
    ("q_piqe_out", 1e-5, 1e-5),
    ("q_psnr_out", 1e-6, 1e-6),
    # pyiqa's ssim rounds luma to 8 bits: a 1-ulp difference in an input pixel (batched vs
    # single-image float ops) can flip one pixel's rounding, which moves SSIM by ~1e-6.
    ("q_ssim_in", 0.0, 1e-5),
    ("q_ssim_out", 0.0, 1e-5),
)
PIXEL_FILES = 3  # enhanced images compared pixel by pixel








def machine() -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return (f"{cores()} cores ({cpu_model()}), {mem:.1f} GiB, no GPU used; Python "
            f"{platform.python_version()}, torch {torch.__version__} "
            f"({DEFAULT_THREADS} intra-op threads by default)")


def _load() -> str:
    try:
        return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average n/a"


# --------------------------------------------------------------------------- naive


def naive_pipeline(lowlight: Path, reference: Path, out_dir: Path, csv_path: Path,
                   metrics: tuple[str, ...], reference_metrics: tuple[str, ...]
                   ) -> dict[str, Any]:
    """The research-script baseline: the same stages and files, one image at a time.

    PIL decode, the same registries (``create_prior('analytic')``,
    ``create_enhancer('classic-curve')``, ``create_metric(name)``), every measure on the
    input and the output, the enhanced image written with ``Image.save(path)`` (PIL's
    defaults: PNG zlib level 6), one CSV at the end. Default torch threads, no pools.
    Returns wall seconds (model construction excluded, reported as ``setup``) and stage sums.
    """
    from PIL import Image

    from varlide.iqa.base import create_metric
    from varlide.models.base import create_enhancer
    from varlide.priors.base import create_prior

    t = time.perf_counter()
    prior = create_prior("analytic")
    enhancer = create_enhancer("classic-curve")
    measures = {name: create_metric(name) for name in (*metrics, *reference_metrics)}
    setup = time.perf_counter() - t

    times = dict.fromkeys(STAGES, 0.0)
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in sorted(lowlight.glob("*.png")):
        t0 = time.perf_counter()
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        ref = np.asarray(Image.open(reference / path.name).convert("RGB"),
                         dtype=np.float32) / 255.0
        x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
        y = torch.from_numpy(ref).permute(2, 0, 1).unsqueeze(0)
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = prior.score(x)
            t2 = time.perf_counter()
            result = enhancer.enhance(x, scores.visibility, scores.blur)
            out = result.images.clamp(0, 1)
            t3 = time.perf_counter()
            row: dict[str, Any] = {
                "rel_path": path.name, "width": img.shape[1], "height": img.shape[0],
                "visibility": scores.visibility.item(), "blur": scores.blur.item(),
                "route": result.route[0], "n_iter": int(result.n_iter[0]),
            }
            for name in metrics:
                row[f"q_{name}_in"] = measures[name](x).item()
                row[f"q_{name}_out"] = measures[name](out).item()
            for name in reference_metrics:
                row[f"q_{name}_in"] = measures[name](x, y).item()
                row[f"q_{name}_out"] = measures[name](out, y).item()
        t4 = time.perf_counter()
        pixels = out[0].permute(1, 2, 0).numpy()
        Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(
            out_dir / path.name)
        t5 = time.perf_counter()
        for stage, a, b in (("decode", t0, t1), ("prior", t1, t2), ("enhance", t2, t3),
                            ("quality", t3, t4), ("encode/write", t4, t5)):
            times[stage] += b - a
        rows.append(row)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    wall = time.perf_counter() - started
    times["other"] = wall - sum(times[s] for s in STAGES[:-1])
    return {"wall": wall, "setup": setup, "stages": times, "images": len(rows),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- ours


class _ThreadTimer:
    """Wraps a module function to add up its CPU time (``time.thread_time``) over all calls,
    from any thread: pool threads share the cores with the compute lanes, so their wall time
    includes waiting for a core and would overstate the work."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name, self.total, self.calls = module, name, 0.0, 0
        self.original: Callable | None = getattr(module, name, None)
        self._lock = threading.Lock()

    def __enter__(self) -> _ThreadTimer:
        if self.original is None:  # renamed in the engine: report n/a, never fail
            return self
        original = self.original

        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.total += time.thread_time() - t
                    self.calls += 1

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        if self.original is not None:
            setattr(self.module, self.name, self.original)


def run_ours(lowlight: Path, reference: Path, out_dir: Path, run_id: str) -> dict[str, Any]:
    """Our flow with the default config; wall time, engine time and stage sums.

    ``run_id`` only keeps repeats apart (same input and config would otherwise continue one
    MLflow run); it changes nothing else."""
    import varlide.engine as engine
    from flows.enhance import run_enhance
    from varlide.config import Config
    from varlide.storage.runstore import RunStore

    cfg = Config(reference=str(reference), progress=False, run_id=run_id,
                 enhancer="classic-curve")  # the baseline script's enhancer
    with _ThreadTimer(engine, "_read_and_decode") as dec, \
            _ThreadTimer(engine, "_write_enhanced") as enc:
        t = time.perf_counter()
        summary = run_enhance(str(lowlight), str(out_dir), cfg)
        wall = time.perf_counter() - t
    if summary.get("failed_shards") or not summary.get("complete"):
        raise SystemExit(f"our flow failed: {summary.get('failures') or summary}")
    markers = RunStore(str(out_dir), summary["run_id"]).read_markers()
    engine_s = sum(m["seconds"] for m in markers.values())
    stage_ms = {k: sum(m["stage_ms"].get(k, 0.0) for m in markers.values())
                for k in ("decode_ms", "prior_ms", "enhance_ms", "quality_ms")}
    stages = {
        "decode": dec.total if dec.calls else None,
        "prior": stage_ms["prior_ms"] / 1000, "enhance": stage_ms["enhance_ms"] / 1000,
        "quality": stage_ms["quality_ms"] / 1000,
        "encode/write": enc.total if enc.calls else None,
        "other": wall - engine_s,
    }
    return {"wall": wall, "engine": engine_s, "stages": stages,
            "images": int(summary["metrics"].get("images", 0)), "run_id": summary["run_id"],
            "errors": int(summary["metrics"].get("errors", 0))}


def start_prefect_server() -> tuple[float, str]:
    """Start Prefect's temporary server now (unless PREFECT_API_URL is set): seconds, URL."""
    if os.environ.get("PREFECT_API_URL"):
        return 0.0, os.environ["PREFECT_API_URL"]
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses in ephemeral mode
    t = time.perf_counter()
    server.start()
    return time.perf_counter() - t, server.api_url


# --------------------------------------------------------------------------- checks


def compare(ours_dir: Path, naive_csv: Path, naive_images: Path) -> list[str]:
    """Differences between our rows/files and the naive ones; [] when they agree."""
    import pandas as pd
    from PIL import Image

    ours = pd.read_parquet(ours_dir / "scores").sort_values("rel_path").reset_index(drop=True)
    naive = pd.read_csv(naive_csv).sort_values("rel_path").reset_index(drop=True)
    problems = []
    if len(ours) != len(naive):
        problems.append(f"rows: ours {len(ours)} != naive {len(naive)}")
        return problems
    if list(ours["rel_path"]) != list(naive["rel_path"]):
        problems.append("rel_path sets differ")
        return problems
    if (ours["status"] != "ok").any():
        bad = ours.loc[ours["status"] != "ok", "error"].tolist()
        problems.append(f"ours has error rows: {bad}")
    for col, rtol, atol in CHECKS:
        a = ours[col].to_numpy(dtype=np.float64)
        b = naive[col].to_numpy(dtype=np.float64)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            worst = int(np.nanargmax(np.abs(a - b)))
            problems.append(f"{col}: ours {a[worst]!r} vs naive {b[worst]!r} "
                            f"({ours['rel_path'][worst]})")
    names = list(ours["rel_path"])
    picks = sorted({names[0], names[len(names) // 2], names[-1]})[:PIXEL_FILES]
    for name in picks:
        with Image.open(ours_dir / "enhanced" / ours["run_id"][0] / name) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.int16)
        with Image.open(naive_images / name) as im:
            b = np.asarray(im.convert("RGB"), dtype=np.int16)
        if a.shape != b.shape or np.abs(a - b).max() > 0:
            problems.append(f"enhanced pixels of {name} differ")
    return problems


def max_diffs(ours_dir: Path, naive_csv: Path) -> dict[str, float]:
    import pandas as pd

    ours = pd.read_parquet(ours_dir / "scores").sort_values("rel_path").reset_index(drop=True)
    naive = pd.read_csv(naive_csv).sort_values("rel_path").reset_index(drop=True)
    return {col: float(np.nanmax(np.abs(ours[col].to_numpy(np.float64)
                                        - naive[col].to_numpy(np.float64))))
            for col, _, _ in CHECKS}


# --------------------------------------------------------------------------- memory


def _memory_child(lowlight: str, reference: str, out: str) -> int:
    """Subprocess body: one flow run, then our own peak RSS as JSON on the last line.

    The environment (MLflow store, Prefect API URL ...) is the parent's."""
    from flows.enhance import run_enhance
    from varlide.config import Config

    t = time.perf_counter()
    cfg = Config(reference=reference, progress=False, run_id=f"bench-{Path(out).name}",
                 enhancer="classic-curve")
    summary = run_enhance(lowlight, out, cfg)
    print(json.dumps({
        "seconds": time.perf_counter() - t,
        "images": int(summary["metrics"].get("images", 0)),
        "complete": bool(summary.get("complete")),
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    return 0


def measure_memory(lowlight: Path, reference: Path, out: Path, api_url: str) -> dict[str, Any]:
    """Run our flow in a subprocess; its own peak RSS, and the peak of its process tree."""
    env = dict(os.environ, PREFECT_API_URL=api_url)  # reuse this process's server
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child",
           str(lowlight), str(reference), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    tree_peak = 0.0
    try:
        import psutil

        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [parent, *parent.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)
    except ImportError:
        pass
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"memory run failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_mib"] = tree_peak or None
    return result


# --------------------------------------------------------------------------- report


def _fmt_stage(seconds: float | None, images: int) -> str:
    if seconds is None:
        return f"{'n/a':>9} {'':>8}"
    return f"{seconds:8.2f}s {1000 * seconds / images:6.0f}ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="corpus size N (default 48)")
    parser.add_argument("--size", type=_size, default=(640, 480),
                        help="WIDTHxHEIGHT of the corpus images (default 640x480)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each, interleaved; medians are reported (default 1)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the peak-memory runs (1x and K x the corpus)")
    parser.add_argument("--memory-factor", type=int, default=4,
                        help="K: the large memory run has K x N images (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep everything here instead of a temp folder")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    if args.images < 1 or args.repeats < 1 or args.memory_factor < 1:
        parser.error("--images, --repeats and --memory-factor must be >= 1")

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="varlide-bench-")
        workdir = Path(cleanup.name)
    try:
        return _bench(args, workdir)
    finally:
        if cleanup is not None:
            cleanup.cleanup()


def _bench(args: argparse.Namespace, workdir: Path) -> int:
    _setup_env(workdir)
    from varlide.config import Config
    from varlide.demo import make_demo_corpus

    n, (w, h) = args.images, args.size
    _say(f"machine: {machine()}; {_load()}")
    cfg = Config(reference="x")
    metrics, reference_metrics = cfg.metrics, cfg.reference_metrics
    _say(f"stages: prior analytic, enhancer classic-curve, measures "
         f"{','.join(metrics)} + {','.join(reference_metrics)} (reference), on input and output")

    t = time.perf_counter()
    corpus, warm = workdir / "corpus", workdir / "warm"
    make_demo_corpus(str(corpus), count=n, size=(w, h), seed=args.seed)
    make_demo_corpus(str(warm), count=2, size=(w, h), seed=args.seed + 1)
    _say(f"corpus: {n} images {w}x{h} (every 5th 256x256) + references "
         f"(built in {time.perf_counter() - t:.1f}s)")

    server_s, api_url = start_prefect_server()
    _say(f"prefect: temporary server started in {server_s:.1f}s ({api_url})"
         if server_s else f"prefect: using PREFECT_API_URL={api_url}")
    t = time.perf_counter()
    run_ours(warm / "lowlight", warm / "reference", workdir / "out-warm", "bench-warm-up")
    _say(f"warm-up: one flow run on 2 images in {time.perf_counter() - t:.1f}s "
         "(pyiqa import, stage build, MLflow store creation; not timed below)")

    ours_runs, naive_runs = [], []
    for r in range(args.repeats):
        order = ("naive", "ours") if r % 2 == 0 else ("ours", "naive")
        for who in order:
            if who == "naive":
                torch.set_num_threads(DEFAULT_THREADS)  # a plain script's default
                res = naive_pipeline(corpus / "lowlight", corpus / "reference",
                                     workdir / f"naive-{r}", workdir / f"naive-{r}.csv",
                                     metrics, reference_metrics)
                naive_runs.append(res)
            else:
                res = run_ours(corpus / "lowlight", corpus / "reference", workdir / f"ours-{r}",
                               f"bench-ours-{r}")
                ours_runs.append(res)
            _say(f"repeat {r + 1}/{args.repeats}: {who:5s} {res['images']} images in "
                 f"{res['wall']:.1f}s = {res['images'] / res['wall']:.2f} img/s; {_load()}")
        problems = compare(workdir / f"ours-{r}", workdir / f"naive-{r}.csv",
                           workdir / f"naive-{r}")
        if problems:
            _say("CORRECTNESS CHECK FAILED (ours vs naive):")
            for p in problems:
                _say("  " + p)
            return 1
        if r == 0:
            diffs = max_diffs(workdir / "ours-0", workdir / "naive-0.csv")
            _say(f"check: {n} rows each, all ok; max |ours - naive|: "
                 + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
                 + f"; pixels of {PIXEL_FILES} enhanced files identical")
        for who in ("naive", "ours"):
            shutil.rmtree(workdir / f"{who}-{r}", ignore_errors=True)

    naive_wall = statistics.median(x["wall"] for x in naive_runs)
    ours_wall = statistics.median(x["wall"] for x in ours_runs)
    mid_naive = min(naive_runs, key=lambda x: abs(x["wall"] - naive_wall))
    mid_ours = min(ours_runs, key=lambda x: abs(x["wall"] - ours_wall))
    _say(f"\nper stage (the median run of each; seconds and ms per image; {n} images)")
    _say(f"  {'stage':14s} {'naive':>18s}   {'ours':>18s}")
    for stage in STAGES:
        _say(f"  {stage:14s} {_fmt_stage(mid_naive['stages'][stage], n)}   "
             f"{_fmt_stage(mid_ours['stages'][stage], n)}")
    _say(f"  {'wall':14s} {_fmt_stage(mid_naive['wall'], n)}   {_fmt_stage(mid_ours['wall'], n)}")
    _say("  ours: decode (read+hash+decode+reference) and encode/write are CPU seconds in the "
         "I/O pool, overlapped with compute; prior/enhance/quality are compute-lane seconds "
         "(wall, summed over lanes); "
         f"other = flow wall - engine wall ({mid_ours['engine']:.2f}s): planning, Prefect, "
         "MLflow. naive: other = loop, listing, CSV.")
    _say(f"  naive: {mid_naive['threads']} torch threads; model construction "
         f"{mid_naive['setup']:.1f}s (not timed)")

    naive_ips = n / naive_wall
    ours_ips = n / ours_wall
    total_ips = n / (ours_wall + server_s)
    _say(f"\nimages/s (median of {args.repeats}): naive {naive_ips:.3f}; ours {ours_ips:.3f} "
         f"(flow only); ours incl. the Prefect server start ({server_s:.1f}s) {total_ips:.3f}")
    _say(f"ratio incl. the server start: {total_ips / naive_ips:.2f}x")

    if not args.skip_memory:
        k = args.memory_factor
        big = workdir / "corpus-big"
        t = time.perf_counter()
        make_demo_corpus(str(big), count=k * n, size=(w, h), seed=args.seed)
        _say(f"\nmemory: {k}x corpus ({k * n} images) built in {time.perf_counter() - t:.1f}s; "
             "our flow in a subprocess each (Prefect server shared, not counted)")
        one = measure_memory(corpus / "lowlight", corpus / "reference", workdir / "mem-1x",
                             api_url)
        many = measure_memory(big / "lowlight", big / "reference", workdir / "mem-kx", api_url)
        for label, res in ((f"1x ({n})", one), (f"{k}x ({k * n})", many)):
            tree = res["tree_peak_mib"]
            _say(f"  {label:12s} peak RSS {res['maxrss_mib']:7.0f} MiB (process tree "
                 f"{'n/a' if tree is None else f'{tree:.0f} MiB'}), {res['images']} images in "
                 f"{res['seconds']:.1f}s")
        _say(f"memory ratio {k}x / 1x: {many['maxrss_mib'] / one['maxrss_mib']:.2f} "
             "(peak RSS of the flow process; goal <= 1.2)")

    _say(f"\nratio ours / naive (images/s, flow only, median of {args.repeats}): "
         f"{ours_ips / naive_ips:.2f}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
