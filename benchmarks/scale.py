"""A corpus of many small files end to end: images/s, peak RSS, per-shard overhead.

    .venv/bin/python benchmarks/scale.py [--files 100000] [--size 64x48] [--shard-size 256]
                                         [--workers 2] [--baseline-files 5000] [--workdir DIR]

1. writes ``--files`` JPEG files of ``--size`` in folders of 1,000 (1,000 distinct images,
   cycled: a driving dataset's many small crops or thumbnails);
2. OURS: ``varlide enhance CORPUS OUT --enhancer classic-curve --metrics brightness`` in a
   subprocess (the CLI with its own temporary Prefect server, MLflow in a SQLite file under
   the workdir): wall time, the subprocess's peak RSS, and from the shard markers the
   per-shard overhead (wall time not spent inside a shard, per shard in flight);
3. checks it: exactly one row per file, unique paths, every row ok, one marker per shard,
   one enhanced file per row; a failed check exits non-zero;
4. the BASELINE on the first ``--baseline-files`` files: the loop a research script runs
   (one image at a time: PIL decode, the same classic-curve enhancer at batch 1, the mean
   luma, the result saved as JPEG q90, one CSV row), in this process, timed alone;
5. prints both img/s and the ratio ours / baseline LAST.

Only torch at module level (DESIGN.md); varlide is imported where it is used.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import load_average, say, size_arg


def make_corpus(root: Path, n: int, size: tuple[int, int], distinct: int = 1000) -> None:
    """``n`` JPEG files under ``root/dNNN/`` (1,000 per folder), ``distinct`` images cycled."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(min(distinct, n)):
        small = rng.random((h // 8 + 1, w // 8 + 1, 3)) * rng.uniform(20, 120)
        im = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i % 1000:03d}.jpg").write_bytes(blobs[i % len(blobs)])


def run_ours(corpus: Path, out: Path, workdir: Path, shard_size: int,
             workers: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PREFECT_HOME": str(workdir / "prefect")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "varlide.cli", "enhance", str(corpus), str(out),
            "--enhancer", "classic-curve", "--metrics", "brightness", "--no-progress",
            "--json", "--shard-size", str(shard_size), "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(f"varlide enhance failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    text = proc.stdout
    start = 0 if text.startswith("{") else text.index("\n{") + 1  # the --json summary
    summary = json.JSONDecoder().raw_decode(text[start:])[0]
    return {"wall": wall, "peak": peak, "summary": summary}


def check(out: Path, run_id: str, n: int, shard_size: int) -> dict:
    """One row per file, all ok, one marker per shard, one output per row; the markers'
    shard seconds (for the overhead)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores")
    rel = table.column("rel_path").to_pylist()
    status = table.column("status").to_pylist()
    problems = []
    if len(rel) != n or len(set(rel)) != n:
        problems.append(f"{len(rel)} rows, {len(set(rel))} distinct paths, {n} files")
    bad = [s for s in status if s != "ok"]
    if bad:
        problems.append(f"{len(bad)} rows not ok")
    markers = list((out / "runs" / run_id / "done").glob("shard-*.json"))
    shards = -(-n // shard_size)
    if len(markers) != shards:
        problems.append(f"{len(markers)} markers for {shards} shards")
    enhanced = sum(len(files) for _, _, files in os.walk(out / "enhanced" / run_id))
    if enhanced != n:
        problems.append(f"{enhanced} enhanced files for {n} rows")
    if problems:
        raise SystemExit("check failed: " + "; ".join(problems))
    seconds = [json.loads(m.read_text())["seconds"] for m in markers]
    return {"shards": shards, "shard_seconds": sum(seconds)}


def baseline(corpus: Path, n: int, out_dir: Path) -> float:
    """The research-script loop on the first ``n`` files; returns seconds."""
    import numpy as np
    from PIL import Image

    from varlide.models import create_enhancer

    model = create_enhancer("classic-curve")
    files = sorted(corpus.rglob("*.jpg"))[:n]
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out_dir / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "brightness"])
        for path in files:
            arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(arr).permute(2, 0, 1)[None]
            luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean()
            with torch.inference_mode():
                y = model.enhance(x, luma.reshape(1), torch.zeros(1)).images[0]
            pix = (y.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            rel = path.relative_to(corpus)
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix).save(target, quality=90)
            writer.writerow([str(rel), float(luma)])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--size", type=size_arg, default=(64, 48))
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-files", type=int, default=5000)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="varlide-scale-"))
    corpus, out = workdir / "corpus", workdir / "out"
    say(f"load before: {load_average()}")
    if not corpus.is_dir():
        t0 = time.perf_counter()
        make_corpus(corpus, args.files, args.size)
        say(f"corpus: {args.files} files {args.size[0]}x{args.size[1]} in "
            f"{time.perf_counter() - t0:.1f} s")
    ours = run_ours(corpus, out, workdir, args.shard_size, args.workers)
    run_id = ours["summary"]["run_id"]
    checked = check(out, run_id, args.files, args.shard_size)
    wall, shards = ours["wall"], checked["shards"]
    in_shards = checked["shard_seconds"] / args.workers
    say(f"ours: {args.files} files in {wall:.1f} s = {args.files / wall:.1f} img/s, peak RSS "
        f"{ours['peak'] / 2**30:.2f} GB; {shards} shards, {checked['shard_seconds']:.1f} s "
        f"inside shards; overhead {(wall - in_shards) / shards * 1000:.0f} ms per shard "
        f"({100 * (wall - in_shards) / wall:.1f} % of the wall time, start-up included)")
    say(f"load after ours: {load_average()}")
    n = min(args.baseline_files, args.files)
    base = baseline(corpus, n, workdir / "baseline")
    say(f"baseline: {n} files in {base:.1f} s = {n / base:.1f} img/s")
    say(f"load after: {load_average()}")
    say(f"ratio ours / baseline (img/s): {(args.files / wall) / (n / base):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
