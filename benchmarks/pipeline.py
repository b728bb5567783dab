"""The default job against what a user would otherwise run, on real-size JPEG frames.

    .venv/bin/python benchmarks/pipeline.py [--images N] [--size WxH] [--repeats R]
                                            [--skip-memory] [--memory-factor K] [--workdir DIR]

(``make bench`` runs it with the defaults: 48 frames of 1280x720.) All in one process run:

1. makes N JPEG frames of ``--size`` (train-sice photographs resized and darkened,
   ``benchmarks.memory.make_frames``; synthetic scenes when ../shared/data is absent);
2. starts Prefect's temporary server (timed on its own) and warms up on 2 other frames
   (imports, stage build, the MLflow store; not timed below);
3. repeats R times, alternating which goes first:
   - OURS: ``flows.enhance.run_enhance`` with the default ``Config`` (varlide-lite on its
     shipped weights, the analytic prior, the seven default measures on input and output,
     JPEG out at quality 90), progress off, MLflow in a temporary SQLite file;
   - the BASELINE (``baseline`` below): the Zero-DCE reference test loop (one image at a
     time: PIL decode, /255, DCE-Net forward at full resolution in fp32 with its 8 curve
     iterations, the result saved as JPEG q90 under the same name; its weights are our
     trained zero-dce ones, built once rather than per image as the reference script does),
     then pyiqa's own loop per measure: one ``pyiqa.create_metric`` per measure it has
     (``piqe``), scoring each input and output file by path, one at a time; the measures
     pyiqa lacks (brightness ... overexposed) the same way through ``create_metric``, one
     PIL-decoded image at a time; one CSV. Default torch threads, no pools;
4. checks both: N rows each, every one ok, the input-side scores equal (the same measures
   on the same pixels: pyiqa's piqe against ours to 1e-5), N enhanced files each
   (different enhancers, so output pixels are not compared); a failed check exits non-zero;
5. prints img/s of each, a per-stage breakdown and, unless ``--skip-memory``, the peak RSS
   of our flow on 1x and K x the corpus (one subprocess each);
6. prints the ratio ours / baseline LAST.

Timing: "flow" is the wall time of one ``run_enhance`` call with the Prefect server up and
the process warm: planning, the shard, Parquet, markers and MLflow are inside it; the
server's start is a fixed per-process cost (printed, and in a second ratio). The baseline's
model construction is likewise outside its timing.

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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import cores, cpu_model, link_or_copy, own_peak_rss  # noqa: E402
from benchmarks._common import say as _say  # noqa: E402
from benchmarks._common import setup_env as _setup_env  # noqa: E402
from benchmarks._common import size_arg as _size  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # what a plain script gets (the baseline)
STAGES = ("decode", "prior", "enhance", "quality", "encode/write", "other")
MEASURES = ("brightness", "contrast", "entropy", "colorfulness", "sharpness", "overexposed",
            "piqe")  # Config's defaults (checked in _bench)
# Input-side columns compared between ours (Parquet) and the baseline (CSV): the same
# measures on the same decoded pixels. (column, rtol, atol).
CHECKS = tuple((f"q_{m}_in", 1e-5, 1e-5) for m in MEASURES)
JPEG_QUALITY = 90  # what our default writes (Config.quality)


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


# --------------------------------------------------------------------------- baseline


class DCENet(torch.nn.Module):
    """Zero-DCE's ``enhance_net_nopool`` as its reference test script runs it: seven 3x3
    convolutions of 32 channels with the symmetric skips, 24 tanh maps, 8 iterations of
    ``x + r (x^2 - x)`` at full resolution, fp32. Written here from the paper."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        cins = (3, width, width, width, 2 * width, 2 * width, 2 * width)
        couts = (width,) * 6 + (24,)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, 3, 1, 1) for i, o in
                                         zip(cins, couts, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        x1 = F.relu(c[0](x))
        x2 = F.relu(c[1](x1))
        x3 = F.relu(c[2](x2))
        x4 = F.relu(c[3](x3))
        x5 = F.relu(c[4](torch.cat([x3, x4], 1)))
        x6 = F.relu(c[5](torch.cat([x2, x5], 1)))
        maps = torch.tanh(c[6](torch.cat([x1, x6], 1)))
        for r in torch.split(maps, 3, dim=1):
            x = x + r * (x * x - x)
        return x


def load_dce() -> DCENet:
    """DCENet with our trained zero-dce weights (the same layers under other names)."""
    from safetensors.torch import load_file

    from varlide.models.varlide_lite import default_weights_dir

    net = DCENet()
    state = load_file(str(Path(default_weights_dir("zero-dce")) / "model.safetensors"))
    mapped = {f"convs.{int(k.split('.')[1][4:]) - 1}.{k.split('.')[2]}": v
              for k, v in state.items() if k.startswith("curve.conv")}
    net.load_state_dict(mapped)
    return net.eval()


def _pil_tensor(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def baseline(frames: Path, out_dir: Path, csv_path: Path) -> dict[str, Any]:
    """The research-script baseline (module docstring, step 3): wall seconds, stage sums."""
    import pyiqa
    from PIL import Image

    from varlide.iqa.base import create_metric
    from varlide.priors.base import create_prior

    t = time.perf_counter()
    net = load_dce()
    prior = create_prior("analytic")  # the rows carry v and b, as ours do
    setup = time.perf_counter() - t
    times = dict.fromkeys(STAGES, 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(frames.glob("*.jpg"))
    rows = {p.name: {"rel_path": p.name} for p in paths}
    started = time.perf_counter()
    for path in paths:  # the Zero-DCE reference test loop
        t0 = time.perf_counter()
        x = _pil_tensor(path)
        t1 = time.perf_counter()
        with torch.no_grad():
            scores = prior.score(x)
            t2 = time.perf_counter()
            y = net(x).clamp(0, 1)
        t3 = time.perf_counter()
        pixels = (y[0].permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out_dir / path.name, quality=JPEG_QUALITY)
        t4 = time.perf_counter()
        rows[path.name].update(width=x.shape[-1], height=x.shape[-2],
                               visibility=scores.visibility.item(), blur=scores.blur.item())
        for stage, a, b in (("decode", t0, t1), ("prior", t1, t2), ("enhance", t2, t3),
                            ("encode/write", t3, t4)):
            times[stage] += b - a
    t0 = time.perf_counter()
    for name in MEASURES:  # pyiqa's loop per measure, by file path; ours where pyiqa has none
        if name in pyiqa.list_models():
            metric = pyiqa.create_metric(name, device="cpu")
            score = lambda p, m=metric: float(m(str(p)))  # noqa: E731
        else:
            metric = create_metric(name)
            score = lambda p, m=metric: float(m(_pil_tensor(p))[0])  # noqa: E731
        for path in paths:
            rows[path.name][f"q_{name}_in"] = score(path)
            rows[path.name][f"q_{name}_out"] = score(out_dir / path.name)
    times["quality"] = time.perf_counter() - t0
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[paths[0].name]))
        writer.writeheader()
        writer.writerows(rows.values())
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


def run_ours(frames: Path, out_dir: Path, run_id: str) -> dict[str, Any]:
    """Our flow with the default config; wall time, engine time and stage sums.

    ``run_id`` only keeps repeats apart (same input and config would otherwise continue one
    MLflow run); it changes nothing else."""
    import varlide.engine as engine
    from flows.enhance import run_enhance
    from varlide.config import Config
    from varlide.storage.runstore import RunStore

    cfg = Config(progress=False, run_id=run_id)  # the defaults
    with _ThreadTimer(engine, "_read_and_decode") as dec, \
            _ThreadTimer(engine, "_write_enhanced") as enc:
        t = time.perf_counter()
        summary = run_enhance(str(frames), str(out_dir), cfg)
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




# --------------------------------------------------------------------------- checks


def compare(ours_dir: Path, base_csv: Path, base_images: Path, n: int) -> list[str]:
    """Differences between our rows/files and the baseline's; [] when they agree."""
    import pandas as pd

    ours = pd.read_parquet(ours_dir / "scores").sort_values("rel_path").reset_index(drop=True)
    base = pd.read_csv(base_csv).sort_values("rel_path").reset_index(drop=True)
    if len(ours) != n or len(base) != n:
        return [f"rows: ours {len(ours)}, baseline {len(base)}, frames {n}"]
    if list(ours["rel_path"]) != list(base["rel_path"]):
        return ["rel_path sets differ"]
    problems = []
    if (ours["status"] != "ok").any():
        problems.append(f"ours has error rows: {ours.loc[ours['status'] != 'ok', 'error']}")
    for col, rtol, atol in CHECKS:
        a, b = ours[col].to_numpy(np.float64), base[col].to_numpy(np.float64)
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            worst = int(np.nanargmax(np.abs(a - b)))
            problems.append(f"{col}: ours {a[worst]!r} vs baseline {b[worst]!r} "
                            f"({ours['rel_path'][worst]})")
    enhanced = ours_dir / "enhanced" / ours["run_id"][0]
    for who, folder in (("ours", enhanced), ("baseline", base_images)):
        count = len(list(folder.glob("*.jpg")))
        if count != n:
            problems.append(f"{who}: {count} enhanced files, expected {n}")
    return problems


def max_diffs(ours_dir: Path, base_csv: Path) -> dict[str, float]:
    import pandas as pd

    ours = pd.read_parquet(ours_dir / "scores").sort_values("rel_path").reset_index(drop=True)
    base = pd.read_csv(base_csv).sort_values("rel_path").reset_index(drop=True)
    return {col: float(np.nanmax(np.abs(ours[col].to_numpy(np.float64)
                                        - base[col].to_numpy(np.float64))))
            for col, _, _ in CHECKS}


# --------------------------------------------------------------------------- memory


def _memory_child(frames: str, out: str) -> int:
    """Subprocess body: one flow run, then our own peak RSS as JSON on the last line.

    The environment (MLflow store, Prefect API URL ...) is the parent's."""
    from varlide import allocator

    allocator.tune()  # as the CLI does first thing
    from flows.enhance import run_enhance
    from varlide.config import Config

    t = time.perf_counter()
    summary = run_enhance(frames, out, Config(progress=False, run_id=f"bench-{Path(out).name}"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": time.perf_counter() - t,
        "images": int(summary["metrics"].get("images", 0)),
        "complete": bool(summary.get("complete")),
        "maxrss_mib": own_peak_rss() / 2**20,
        "sys_share": usage.ru_stime / max(1e-9, usage.ru_utime + usage.ru_stime),
    }))
    return 0


def measure_memory(frames: Path, out: Path, api_url: str) -> dict[str, Any]:
    """Run our flow in a subprocess; its own peak RSS, and the peak of its process tree."""
    env = dict(os.environ, PREFECT_API_URL=api_url)  # reuse this process's server
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(frames),
           str(out)]
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
    parser.add_argument("--size", type=_size, default=(1280, 720),
                        help="WIDTHxHEIGHT of the JPEG frames (default 1280x720)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each, interleaved; medians are reported (default 1)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="skip the peak-memory runs (1x and K x the corpus)")
    parser.add_argument("--memory-factor", type=int, default=4,
                        help="K: the large memory run has K x N images (default 4)")
    parser.add_argument("--workdir", help="keep everything here instead of a temp folder")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return _memory_child(*args.memory_child)
    if args.images < 1 or args.repeats < 1 or args.memory_factor < 1:
        parser.error("--images, --repeats and --memory-factor must be >= 1")
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return _bench(args, workdir)
    with tempfile.TemporaryDirectory(prefix="varlide-bench-") as tmp:
        return _bench(args, Path(tmp))


def _bench(args: argparse.Namespace, workdir: Path) -> int:
    _setup_env(workdir)
    from benchmarks.memory import make_frames
    from varlide.config import Config

    n, (w, h) = args.images, args.size
    if tuple(Config().metrics) != MEASURES:
        raise SystemExit(f"the default measures changed ({Config().metrics}); update MEASURES")
    _say(f"machine: {machine()}; {_load()}")
    _say("stages: prior analytic, enhancer varlide-lite (shipped weights) vs Zero-DCE "
         f"(full resolution, fp32), measures {','.join(MEASURES)} on input and output")
    t = time.perf_counter()
    frames, warm = workdir / "frames", workdir / "warm"
    make_frames(frames, n, (w, h))
    make_frames(warm, 2, (w, h))
    _say(f"corpus: {n} JPEG frames {w}x{h} (built in {time.perf_counter() - t:.1f}s)")

    server_s, api_url = start_prefect_server()
    _say(f"prefect: temporary server started in {server_s:.1f}s ({api_url})"
         if server_s else f"prefect: using PREFECT_API_URL={api_url}")
    t = time.perf_counter()
    run_ours(warm, workdir / "out-warm", "bench-warm-up")
    _say(f"warm-up: one flow run on 2 frames in {time.perf_counter() - t:.1f}s (not timed)")

    ours_runs, base_runs = [], []
    for r in range(args.repeats):
        order = ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline")
        for who in order:
            if who == "baseline":
                torch.set_num_threads(DEFAULT_THREADS)  # a plain script's default
                res = baseline(frames, workdir / f"baseline-{r}", workdir / f"baseline-{r}.csv")
                base_runs.append(res)
            else:
                res = run_ours(frames, workdir / f"ours-{r}", f"bench-ours-{r}")
                ours_runs.append(res)
            _say(f"repeat {r + 1}/{args.repeats}: {who:8s} {res['images']} frames in "
                 f"{res['wall']:.1f}s = {res['images'] / res['wall']:.2f} img/s; {_load()}")
        problems = compare(workdir / f"ours-{r}", workdir / f"baseline-{r}.csv",
                           workdir / f"baseline-{r}", n)
        if problems:
            _say("CHECK FAILED (ours vs baseline):")
            for p in problems:
                _say("  " + p)
            return 1
        if r == 0:
            diffs = max_diffs(workdir / "ours-0", workdir / "baseline-0.csv")
            _say(f"check: {n} rows each, all ok, {n} enhanced files each; input-side scores "
                 "max |ours - baseline|: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
        for who in ("baseline", "ours"):
            shutil.rmtree(workdir / f"{who}-{r}", ignore_errors=True)

    base_wall = statistics.median(x["wall"] for x in base_runs)
    ours_wall = statistics.median(x["wall"] for x in ours_runs)
    mid_base = min(base_runs, key=lambda x: abs(x["wall"] - base_wall))
    mid_ours = min(ours_runs, key=lambda x: abs(x["wall"] - ours_wall))
    _say(f"\nper stage (the median run of each; seconds and ms per frame; {n} frames)")
    _say(f"  {'stage':14s} {'baseline':>18s}   {'ours':>18s}")
    for stage in STAGES:
        _say(f"  {stage:14s} {_fmt_stage(mid_base['stages'][stage], n)}   "
             f"{_fmt_stage(mid_ours['stages'][stage], n)}")
    _say(f"  {'wall':14s} {_fmt_stage(mid_base['wall'], n)}   {_fmt_stage(mid_ours['wall'], n)}")
    _say("  ours: decode (read+hash+decode) and encode/write are CPU seconds in the I/O pool, "
         "overlapped with compute; prior/enhance/quality are compute-lane seconds (summed "
         f"over lanes); other = flow wall - engine wall ({mid_ours['engine']:.2f}s): "
         "planning, Prefect, MLflow. baseline: quality = its measure loops (file decode "
         "included); other = the loop, listing, CSV.")
    _say(f"  baseline: {mid_base['threads']} torch threads; model construction "
         f"{mid_base['setup']:.1f}s (not timed)")

    base_ips, ours_ips = n / base_wall, n / ours_wall
    total_ips = n / (ours_wall + server_s)
    _say(f"\nimages/s (median of {args.repeats}): baseline {base_ips:.3f}; ours {ours_ips:.3f} "
         f"(flow only, goal >= 3 at 1280x720); ours incl. the Prefect server start "
         f"({server_s:.1f}s) {total_ips:.3f}")
    _say(f"ratio incl. the server start: {total_ips / base_ips:.2f}x")

    if not args.skip_memory:
        k = args.memory_factor
        big = workdir / "frames-big"
        big.mkdir(exist_ok=True)
        for i in range(k):  # K copies of the corpus under other names (same pixels)
            for p in sorted(frames.glob("*.jpg")):
                link_or_copy(p, big / f"c{i}-{p.name}")
        _say(f"\nmemory: {k}x corpus ({k * n} frames); our flow in a subprocess each "
             "(Prefect server shared, not counted)")
        one = measure_memory(frames, workdir / "mem-1x", api_url)
        many = measure_memory(big, workdir / "mem-kx", api_url)
        for label, res in ((f"1x ({n})", one), (f"{k}x ({k * n})", many)):
            tree = res["tree_peak_mib"]
            _say(f"  {label:12s} peak RSS {res['maxrss_mib']:7.0f} MiB (process tree "
                 f"{'n/a' if tree is None else f'{tree:.0f} MiB'}), {res['images']} frames in "
                 f"{res['seconds']:.1f}s, system time {res['sys_share']:.0%} of CPU time")
        _say(f"memory ratio {k}x / 1x: {many['maxrss_mib'] / one['maxrss_mib']:.2f} "
             "(peak RSS of the flow process; goal <= 1.2)")

    _say(f"\nratio ours / baseline (images/s, flow only, median of {args.repeats}): "
         f"{ours_ips / base_ips:.2f}x (goal >= 5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
