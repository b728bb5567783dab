"""Soak: N small images, input and output on S3 behind the fault proxy, K SIGKILLs of the CLI.

The long version of tests/test_faults.py. The script starts moto's S3 server on 127.0.0.1,
uploads N tiny PNGs straight to it, puts ``tests/faultproxy.py`` in front of it (503
SlowDown, 500 InternalError, resets mid-body, slow responses, at ``--fault-rate`` of all
requests), and runs ``varlide enhance s3://soak/in/night s3://soak/out`` (classic-curve, one
cheap measure) as a subprocess pointed at the proxy. K times it SIGKILLs the CLI at a seeded
random point, cycling through: during start-up / listing, mid-shard, and between a shard's
Parquet PUT and its marker PUT (the proxy stalls that marker PUT, then drops it when the
client dies). After each kill it runs the same command again; the last one runs to the end
(re-run while shards fail after their retries). Then, reading straight from moto (not through
the proxy): exactly one row per image, one Parquet object and one marker per shard, nothing
else under the output prefix, and every marker that existed at a kill unchanged at the end
(finished shards not recomputed). It also checks that no process of a killed CLI (its
temporary Prefect server) is left running.

    .venv/bin/python benchmarks/soak.py                         # 10,000 images, 3 kills
    .venv/bin/python benchmarks/soak.py --images 2000 --kills 3 --fault-rate 0.15

By default each CLI start runs its own temporary Prefect server (the user's path, ~20-30 s of
start-up per start on a small machine); ``--shared-prefect`` points them all at one.

Prints a table: fault, how injected, how many, rows expected / found / duplicated / lost,
time to recover; ``--json FILE`` writes the figures. Exit code 0 only when nothing was lost,
nothing duplicated and nothing orphaned.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BUCKET = "soak"
POINTS = ("start-up", "mid-shard", "between-parquet-and-marker")


def say(*parts) -> None:
    print(*parts, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([0.5 + 0.5 * np.sin(xx / (3 + 2 * c) + yy / (5 + c) + rng.uniform(0, 6))
                     for c in range(3)], axis=-1)
    img = np.clip((base * 0.8 + 0.2 * rng.random((size, size, 3))) * 0.2 * 255, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def rel_paths(n: int) -> list[str]:
    return sorted(f"cam_{i % 7}/f{i:06d}.png" for i in range(n))


class Upstream:
    """s3fs straight at moto: what the soak trusts."""

    def __init__(self, endpoint: str):
        import s3fs

        self.fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint},
                                    skip_instance_cache=True, use_listings_cache=False)

    def keys(self, prefix: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(self.fs.find(f"{BUCKET}/{prefix}"))
        except FileNotFoundError:
            return []

    def markers(self) -> dict[str, bytes]:
        keys = [k for k in self.keys("out/runs") if re.search(r"/done/shard-\d+\.json$", k)]
        return self.fs.cat(keys) if keys else {}






def verify(up: Upstream, rels: list[str]) -> dict:
    """Exactly-once from the upstream: rows, markers, Parquet objects, orphans."""
    import pyarrow.parquet as pq

    root = f"{BUCKET}/out"
    keys = up.keys("out")
    run_ids = sorted({k.split("/")[3] for k in keys if k.startswith(f"{root}/runs/")})
    if len(run_ids) != 1:
        return {"error": f"expected one run id, found {run_ids}"}
    run_id = run_ids[0]
    manifest = json.loads(up.fs.cat_file(f"{root}/runs/{run_id}/manifest.json"))
    dataset, shards = manifest["dataset"], len(manifest["plan"])
    parquet = [k for k in keys if re.fullmatch(
        rf"{root}/scores/{re.escape(dataset)}/{run_id}/shard-\d{{5}}\.parquet", k)]
    markers = [k for k in keys if re.fullmatch(rf"{root}/runs/{run_id}/done/shard-\d{{5}}\.json",
                                               k)]
    enhanced = {k for k in keys if k.startswith(f"{root}/enhanced/{run_id}/")}
    known = set(parquet) | set(markers) | enhanced | {f"{root}/runs/{run_id}/manifest.json"}
    orphans = sorted(set(keys) - known)
    found: list[str] = []
    statuses: dict[str, int] = {}
    unreadable = []
    want_enhanced = set()
    marker_mismatch = 0
    blobs = up.fs.cat(parquet)
    for k in parquet:
        try:
            t = pq.read_table(io.BytesIO(blobs[k]))
        except Exception as exc:  # a partial object
            unreadable.append(f"{k}: {exc}")
            continue
        found += t.column("rel_path").to_pylist()
        for s in t.column("status").to_pylist():
            statuses[s] = statuses.get(s, 0) + 1
        want_enhanced |= {u.removeprefix("s3://") for u in t.column("enhanced_uri").to_pylist()
                          if u}
        mk = k.replace(f"/scores/{dataset}/", "/runs/").replace(
            f"/{run_id}/shard-", f"/{run_id}/done/shard-").replace(".parquet", ".json")
        if mk in markers and json.loads(up.fs.cat_file(mk))["rows"] != t.num_rows:
            marker_mismatch += 1
    dup = len(found) - len(set(found))
    lost = len(set(rels) - set(found))
    extra = len(set(found) - set(rels))
    return {"run_id": run_id, "shards": shards, "parquet_objects": len(parquet),
            "markers": len(markers), "expected": len(rels), "found": len(found),
            "duplicated": dup, "lost": lost, "unexpected": extra, "statuses": statuses,
            "orphans": orphans[:20], "orphan_count": len(orphans), "unreadable": unreadable,
            "enhanced_missing": len(want_enhanced - enhanced),
            "enhanced_unreferenced": len(enhanced - want_enhanced),
            "marker_row_mismatch": marker_mismatch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2, help="--workers of the CLI")
    ap.add_argument("--fault-rate", type=float, default=0.15,
                    help="share of S3 requests faulted (split 30/25/25/20 %% over SlowDown, "
                    "500, reset mid-body, slow response)")
    ap.add_argument("--delay", default="0.02,0.3", help="slow-response seconds MIN,MAX")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs of the CLI before the end")
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--shared-prefect", action="store_true",
                    help="one Prefect server for every CLI start (default: each its own)")
    ap.add_argument("--workdir", help="default: a new temporary folder")
    ap.add_argument("--timeout", type=float, default=3600, help="per CLI start, seconds")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="varlide-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "AWS_ACCESS_KEY_ID": "soak-key-id", "AWS_SECRET_ACCESS_KEY": "soak-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "VARLIDE_RETRY_DELAY_S": "0.5",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    rng = random.Random(args.seed)
    lo, hi = (float(v) for v in args.delay.split(","))
    r = args.fault_rate

    from faultproxy import FaultProxy
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    upstream = f"http://127.0.0.1:{port}"
    up = Upstream(upstream)
    up.fs.mkdir(BUCKET)
    rels = rel_paths(args.images)
    t0 = time.perf_counter()
    for i in range(0, len(rels), 500):
        up.fs.pipe({f"{BUCKET}/in/night/{rel}": png(i + j, args.size)
                    for j, rel in enumerate(rels[i:i + 500])})
    say(f"soak: {len(rels)} images of {args.size}x{args.size} uploaded to moto in "
        f"{time.perf_counter() - t0:.1f} s; workdir {work}")

    proxy = FaultProxy(upstream, slowdown=0.30 * r, internal_error=0.25 * r, reset=0.25 * r,
                       delay=0.20 * r, delay_s=(lo, hi), seed=args.seed)
    proxy.start()
    env["AWS_ENDPOINT_URL"] = proxy.url
    shared_server = None
    if args.shared_prefect:
        sys.path.insert(0, str(REPO))
        os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
        from flows import start_temporary_server

        shared_server = start_temporary_server(force=True)
        env["PREFECT_API_URL"] = shared_server.wait_ready(180)
    cmd = [sys.executable, "-m", "varlide.cli", "enhance", f"s3://{BUCKET}/in/night",
           f"s3://{BUCKET}/out", "--enhancer", "classic-curve", "--metrics", "brightness",
           "--device", "cpu", "--shard-size", str(args.shard_size), "--workers",
           str(args.workers), "--no-progress"]
    shards_total = -(-len(rels) // args.shard_size)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    starts: list[dict] = []

    def start() -> subprocess.Popen:
        n = len(starts)
        with open(logs / f"{n:02d}.out", "wb") as out, open(logs / f"{n:02d}.err", "wb") as err:
            proc = subprocess.Popen(cmd, env=env, cwd=work, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err)
        starts.append({"n": n, "pid": proc.pid, "t_start": time.monotonic(),
                       "markers_at_start": len(up.markers())})
        return proc

    kills: list[dict] = []
    frozen: dict[str, bytes] = {}
    leftovers: list[str] = []
    wall0 = time.monotonic()
    last_kill_t: float | None = None

    def watch_recovery(proc, rec: dict | None, stop) -> None:
        """Record, on ``rec``, the first new marker after its kill: back at work."""
        base = len(up.markers())
        while rec is not None and proc.poll() is None and not stop():
            if len(up.markers()) > base:
                rec["recover_s"] = round(time.monotonic() - rec["t_kill"], 1)
                return
            time.sleep(0.25)

    for k in range(args.kills):
        point = POINTS[k % len(POINTS)]
        before = up.markers()
        if len(before) >= shards_total - 1:
            say(f"kill {k + 1}: skipped, the run is nearly complete ({len(before)} shards)")
            break
        rule = None
        if point == "between-parquet-and-marker":
            rule = proxy.add_rule(lambda m, p, h: m == "PUT" and re.search(
                r"/done/shard-\d+\.json$", p.split("?")[0]) is not None, "stall", times=1,
                delay_s=300.0)
        proc = start()
        prev = kills[-1] if kills else None
        deadline = time.monotonic() + args.timeout
        if point == "start-up":
            time.sleep(rng.uniform(1.0, 12.0))
        elif point == "mid-shard":
            target = len(before) + rng.randint(1, max(1, (shards_total - len(before)) // 3))
            while len(up.markers()) < target and proc.poll() is None \
                    and time.monotonic() < deadline:
                if prev is not None and "recover_s" not in prev and len(up.markers()) > len(before):
                    prev["recover_s"] = round(time.monotonic() - prev["t_kill"], 1)
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            while rule.hits < 1 and proc.poll() is None and time.monotonic() < deadline:
                if prev is not None and "recover_s" not in prev and len(up.markers()) > len(before):
                    prev["recover_s"] = round(time.monotonic() - prev["t_kill"], 1)
                time.sleep(0.05)
            time.sleep(0.3)
        if prev is not None and "recover_s" not in prev and len(up.markers()) > len(before):
            prev["recover_s"] = round(time.monotonic() - prev["t_kill"], 1)
        if proc.poll() is not None:
            say(f"kill {k + 1} ({point}): the CLI had already exited with {proc.returncode}")
            kills.append({"point": point, "killed": False, "rc": proc.returncode,
                          "t_kill": time.monotonic()})
            continue
        sys.path.insert(0, str(REPO / "tests"))
        from proctree import alive, descendants  # psutil: not at module level

        tree = descendants(proc.pid)
        at_kill = up.markers()
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait()
        gone_by = time.monotonic() + 10
        while alive(tree) and time.monotonic() < gone_by:
            time.sleep(0.1)
        left = alive(tree)
        leftovers += [" ".join(p.cmdline())[:120] for p in left]
        for p in left:
            p.kill()
        time.sleep(0.5)
        after = up.markers()
        rec = {"point": point, "killed": True, "t_kill": t_kill,
               "s_after_start": round(t_kill - starts[-1]["t_start"], 1),
               "markers_at_kill": len(at_kill), "markers_after": len(after),
               "children": len(tree), "left_running": len(left)}
        if rule is not None:
            rec["stalled_marker_dropped"] = proxy.dropped
            rec["stalled_marker"] = rule.requests[0][1].split("?")[0] if rule.requests else None
        rewritten = [key for key, v in before.items() if after.get(key) != v]
        rec["finished_shards_recomputed"] = len(rewritten)
        for key, v in after.items():
            frozen.setdefault(key, v)
        if prev is not None and "recover_s" not in prev:
            prev["recover_s"] = None  # killed again before it wrote a new marker
        kills.append(rec)
        last_kill_t = t_kill
        say(f"kill {k + 1}: {point} at {rec['s_after_start']} s after start, "
            f"{len(at_kill)}/{shards_total} shards done, {len(tree)} child process(es), "
            f"{len(left)} left running")

    final_runs = []
    for attempt in range(3):
        proc = start()
        prev = kills[-1] if kills and kills[-1].get("killed") else None
        if attempt == 0 and prev is not None:
            watch_recovery(proc, prev, lambda: False)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t_end = time.monotonic()
        final_runs.append({"rc": proc.returncode,
                           "seconds": round(t_end - starts[-1]["t_start"], 1)})
        if prev is not None and "recover_s" not in prev:
            prev["recover_s"] = round(t_end - prev["t_kill"], 1)
        say(f"run to the end, attempt {attempt + 1}: exit {proc.returncode} in "
            f"{final_runs[-1]['seconds']} s")
        if proc.returncode != 1:  # 1: shards failed after retries -> the same command again
            break
    complete_s = round(time.monotonic() - (last_kill_t or wall0), 1)
    proxy.stop()
    time.sleep(0.5)

    result = verify(up, rels)
    end_markers = up.markers()
    recomputed = [k for k, v in frozen.items() if end_markers.get(k) != v]
    result["finished_shards_recomputed"] = len(recomputed)
    result["left_running"] = leftovers
    faults = proxy.summary()
    say("")
    say(f"S3 requests {faults['requests']}, forwarded {faults['forwarded']}, faults "
        f"{faults['faults']}, stalled+dropped {faults['dropped']}")
    say(f"verify: {json.dumps({k: v for k, v in result.items() if k != 'orphans'})}")
    if result.get("orphans"):
        say(f"orphans: {result['orphans']}")

    exp, fnd = result.get("expected", len(rels)), result.get("found", 0)
    dup, lost = result.get("duplicated", "?"), result.get("lost", "?")
    rows = []
    how = {"slowdown": f"proxy: 503 SlowDown, p={0.30 * r:.3f}/request",
           "internal_error": f"proxy: 500 InternalError, p={0.25 * r:.3f}",
           "reset": f"proxy: TCP RST mid-body (GET), p={0.25 * r:.3f}",
           "delay": f"proxy: response held {lo}-{hi} s, p={0.20 * r:.3f}"}
    for kind, label in (("slowdown", "S3 503 SlowDown"), ("internal_error", "S3 500"),
                        ("reset", "S3 connection reset mid-body"),
                        ("delay", "S3 slow response")):
        rec = proxy.recovery(kind)
        t = (f"median {rec['median_s']:.2f} s, max {rec['max_s']:.2f} s"
             if rec["median_s"] is not None else "-")
        if rec["abandoned"]:
            t += f"; {rec['abandoned']} never retried (their CLI was killed)"
        rows.append((label, how[kind], faults["faults"][kind], t))
    for point in POINTS:
        ks = [x for x in kills if x["point"] == point and x.get("killed")]
        if not ks:
            continue
        rec_s = ", ".join("killed again first" if x.get("recover_s") is None
                          else f"{x['recover_s']} s" for x in ks)
        how_k = {"start-up": "SIGKILL of the CLI 1-12 s after start (server boot, listing)",
                 "mid-shard": "SIGKILL after a seeded number of new markers + 0-1 s",
                 "between-parquet-and-marker": "marker PUT stalled by the proxy, SIGKILL"}[point]
        rows.append((f"SIGKILL {point}", how_k, len(ks), rec_s + " (to the next new marker)"))
    say("")
    header = ("fault", "how injected", "how many", "rows expected", "found", "duplicated",
              "lost", "time to recover")
    table = [header] + [(a, b, str(c), str(exp), str(fnd), str(dup), str(lost), d)
                        for a, b, c, d in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        say("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    say("")
    say(f"whole soak: {len(starts)} CLI starts, {sum(1 for x in kills if x.get('killed'))} "
        f"kills, {complete_s} s from the last kill to a complete run, "
        f"{time.monotonic() - wall0:.0f} s in all; final runs {final_runs}; load "
        f"{Path('/proc/loadavg').read_text().strip() if Path('/proc/loadavg').exists() else '?'}")
    figures = {"args": vars(args), "faults": faults, "kills": kills, "final_runs": final_runs,
               "verify": result, "complete_after_last_kill_s": complete_s,
               "wall_s": round(time.monotonic() - wall0, 1),
               "recovery": {k: proxy.recovery(k) for k in ("slowdown", "internal_error",
                                                           "reset", "delay")}}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    if shared_server is not None:
        shared_server.stop()
    moto.stop()
    ok = (result.get("duplicated") == 0 and result.get("lost") == 0
          and result.get("orphan_count") == 0 and not result.get("unreadable")
          and result.get("markers") == result.get("shards") == result.get("parquet_objects")
          and not recomputed and not leftovers and final_runs and final_runs[-1]["rc"] == 0)
    say("OK: exactly once" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
