"""Listing + planning + manifest of a large corpus: the previous code path vs ours.

    .venv/bin/python benchmarks/planning.py [--keys 1000000] [--corpus DIR]

Builds (once; reused when ``--corpus`` already holds it) a folder of N empty ``.jpg`` files,
1000 per subfolder, then runs in one subprocess each, peak RSS and wall time measured there:
- BASELINE: the previous path, kept here as it was: fsspec ``find(detail=True)`` and a
  frozen dataclass per key, the owners table of every output name, and the manifest with
  one dict per file written indented (``json.dumps(indent=1)``);
- OURS: ``varlide.run.prepare_run`` (the os.scandir walk, slotted records, compact rows).
Both plan the same shards (checked: same count of files and shards, same first and last
paths). The ratio of peak RSS and of time, baseline / ours, is printed LAST.
Only the standard library at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_OURS = r'''
import json, resource, sys, time
from varlide.config import load_config
from varlide.run import prepare_run
t = time.perf_counter()
plan = prepare_run(sys.argv[1], sys.argv[2], load_config(overrides={"progress": False}))
print(json.dumps({"seconds": time.perf_counter() - t, "files": plan.images,
                  "shards": len(plan.shards), "first": plan.shards[0].files[0].rel_path,
                  "last": plan.shards[-1].files[-1].rel_path,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''

_BASELINE = r'''
import json, os, posixpath, resource, sys, time
from dataclasses import dataclass
import fsspec
t = time.perf_counter()

@dataclass(frozen=True)
class Planned:
    rel_path: str
    size: int
    out_rel_path: str
    out_format: str

fs, root = fsspec.core.url_to_fs(sys.argv[1])
found = fs.find(root, withdirs=False, detail=True)
prefix = root.rstrip("/") + "/"
listed = sorted(((n[len(prefix):], int(i.get("size") or 0)) for n, i in found.items()
                 if n.lower().endswith(".jpg")))
del found
targets = {rel: (rel, "JPEG") for rel, _ in listed}
owners = {}
for rel, (out, _) in targets.items():
    owners.setdefault(out.casefold(), []).append(rel)
files = tuple(Planned(rel, size, targets[rel][0], targets[rel][1]) for rel, size in listed)
shards = [files[i:i + 256] for i in range(0, len(files), 256)]
plan = [{"index": k, "files": [{"rel_path": f.rel_path, "size": f.size,
                                "out_rel_path": f.out_rel_path, "out_format": f.out_format}
                               for f in s]} for k, s in enumerate(shards)]
data = json.dumps({"plan": plan}, indent=1).encode()
os.makedirs(sys.argv[2], exist_ok=True)
with open(os.path.join(sys.argv[2], "manifest.json"), "wb") as f:
    f.write(data)
print(json.dumps({"seconds": time.perf_counter() - t, "files": len(files),
                  "shards": len(shards), "first": files[0].rel_path, "last": files[-1].rel_path,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def make_corpus(root: Path, keys: int) -> None:
    marker = root / f".keys-{keys}"
    if marker.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    for d in range((keys + 999) // 1000):
        sub = root / f"d{d:04d}"
        sub.mkdir(exist_ok=True)
        for f in range(min(1000, keys - d * 1000)):
            (sub / f"f{f:04d}.jpg").touch()
    marker.touch()


def run(code: str, corpus: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, str(corpus), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--corpus", type=Path, default=None)
    args = ap.parse_args()
    corpus = args.corpus or Path(tempfile.gettempdir()) / f"varlide-plan-{args.keys}"
    t = time.perf_counter()
    make_corpus(corpus, args.keys)
    print(f"corpus {corpus}: {args.keys} keys ({time.perf_counter() - t:.0f} s to make); "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        base = run(_BASELINE, corpus, Path(tmp) / "base")
        ours = run(_OURS, corpus, Path(tmp) / "ours")
    for key in ("files", "shards", "first", "last"):
        if base[key] != ours[key]:
            raise SystemExit(f"plans differ in {key}: {base[key]!r} vs {ours[key]!r}")
    print(f"{'':9s} {'seconds':>8s} {'peak RSS':>9s}")
    for name, r in (("baseline", base), ("ours", ours)):
        print(f"{name:9s} {r['seconds']:8.1f} {r['peak_rss'] / 2**30:8.2f}G")
    print(f"ratio baseline / ours: time {base['seconds'] / ours['seconds']:.2f}x, "
          f"peak RSS {base['peak_rss'] / ours['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
