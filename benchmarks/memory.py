"""Where the memory goes, per stage and per job, and the budget against whole-frame work.

    PYTHONPATH=. .venv/bin/python benchmarks/memory.py [--size 1280x720] [--images 16]
                                                     [--baseline-images 4] [--skip-stages]

1. Per stage (one subprocess each, one frame of ``--size``, 1 thread): the peak RSS growth
   of one call over the frame's pixels, in bytes per pixel. These are the figures the cost
   model in ``varlide/memory.py`` / ``varlide/models/curve_net.py`` / the measures'
   ``bytes_per_pixel`` are set from; a stage above its constant is flagged.
2. Per job (``process_shard`` in a subprocess on ``--images`` JPEG frames, the default
   config): peak RSS, user and system CPU time, minor page faults, img/s, for OURS (the
   memory budget, row bands, the tuned allocator) and the BASELINE (the previous default:
   whole frames, full-resolution curve maps, no budget: ``memory_budget: off``, ``downscale:
   1``, glibc's malloc defaults) on ``--baseline-images`` frames (it needs ~1.4 KB per pixel
   per image in a batch; the full corpus would not fit a 24 GB machine).
3. Prints the ratio of peak RSS, baseline / ours, LAST.

Only the standard library, torch and numpy at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import cores, cpu_model, link_or_copy, size_arg  # noqa: E402

STAGES = ("prior", "curve-estimate", "varlide-lite", "varlide-lite-ds1", "brightness",
          "contrast", "entropy", "colorfulness", "sharpness", "overexposed", "piqe")

_STAGE = r'''
import json, resource, sys, torch, numpy as np
from PIL import Image
torch.set_num_threads(1)
stage, path = sys.argv[1], sys.argv[2]
x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
x = x.permute(2, 0, 1)[None].contiguous()
from varlide.iqa.base import create_metric
from varlide.models.base import create_enhancer
from varlide.priors.base import create_prior
v, b = torch.tensor([0.2]), torch.tensor([0.1])
if stage == "prior":
    obj = create_prior("analytic"); fn = lambda: obj.score(x)
elif stage == "curve-estimate":
    obj = create_enhancer("varlide-lite"); fn = lambda: obj.vicm.curve.estimate(x)
elif stage.startswith("varlide-lite"):
    obj = create_enhancer("varlide-lite", skip_visibility=None,
                          **({"downscale": 1} if stage.endswith("ds1") else {}))
    fn = lambda: obj.enhance(x, v, b)
else:
    obj = create_metric(stage); fn = lambda: obj(x)
from benchmarks._common import own_peak_rss
base = own_peak_rss()
with torch.inference_mode():
    fn()
peak = own_peak_rss()
print(json.dumps({"stage": stage, "bytes_per_pixel": (peak - base) / x[0, 0].numel(),
                  "declared": getattr(obj, "bytes_per_pixel", None)}))
'''

_JOB = r'''
import json, os, resource, sys, time
from benchmarks._common import own_peak_rss
if os.environ.get("VARLIDE_MALLOC") != "system":
    from varlide import allocator; allocator.tune()
from varlide.config import load_config
from varlide.engine import process_shard
from varlide.run import prepare_run
inp, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = load_config(overrides={"progress": False, **overrides})
plan = prepare_run(inp, out, cfg, fresh=True)
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for shard in plan.pending:
    process_shard(plan.job(shard))
dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"images": plan.images, "seconds": dt, "img_s": plan.images / dt,
                  "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "minflt": r1.ru_minflt - r0.ru_minflt, "peak_rss": own_peak_rss()}))
'''


def make_frames(folder: Path, n: int, size: tuple[int, int]) -> None:
    """JPEG frames of ``size``: train-sice photographs resized and darkened (synthetic
    scenes when ../shared/data is absent)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "train-sice"
    sources = sorted(shared.glob("*"))[:500] if shared.is_dir() else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if sources:
            im = Image.open(sources[int(rng.integers(len(sources)))]).convert("RGB")
            arr = np.asarray(im.resize(size, Image.BICUBIC), np.float32) * rng.uniform(.15, .6)
        else:
            small = rng.random((size[1] // 32 + 1, size[0] // 32 + 1, 3)) * 90
            arr = np.asarray(Image.fromarray(small.astype(np.uint8)).resize(size), np.float32)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"f{i:04d}.jpg",
                                                                 quality=90)


def _child(code: str, *args: str, env: dict | None = None) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}),
                               "PYTHONPATH": path})
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=size_arg, default=(1280, 720))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--baseline-images", type=int, default=4)
    ap.add_argument("--skip-stages", action="store_true")
    args = ap.parse_args()
    w, h = args.size
    print(f"machine: {cores()} cores ({cpu_model()}); load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames"
        make_frames(frames, args.images, (w, h))
        if not args.skip_stages:
            print(f"\nper stage, one {w}x{h} frame, peak RSS growth of one call:")
            print(f"{'stage':18s} {'B/pixel':>9s} {'declared':>9s}")
            for stage in STAGES:
                r = _child(_STAGE, stage, str(next(frames.glob("*.jpg"))))
                flag = " <- above its constant" if r["declared"] and \
                    r["bytes_per_pixel"] > r["declared"] else ""
                print(f"{stage:18s} {r['bytes_per_pixel']:9.0f} {r['declared'] or '-':>9}{flag}")
        base_in = Path(tmp) / "base"
        base_in.mkdir()
        for p in sorted(frames.glob("*.jpg"))[:args.baseline_images]:
            link_or_copy(p, base_in / p.name)
        ours = _child(_JOB, str(frames), str(Path(tmp) / "o1"), "{}")
        base = _child(_JOB, str(base_in), str(Path(tmp) / "o2"), json.dumps(
            {"memory_budget": "off", "enhancer_options": {"downscale": 1}}),
            env={"VARLIDE_MALLOC": "system"})
    print(f"\njob, {w}x{h} JPEG, default config ({cores()} cores):")
    print(f"{'':10s} {'images':>6s} {'img/s':>6s} {'peak RSS':>9s} {'user s':>7s} "
          f"{'sys s':>6s} {'sys/cpu':>7s} {'minflt':>9s}")
    for name, r in (("ours", ours), ("baseline", base)):
        share = r["sys"] / max(1e-9, r["user"] + r["sys"])
        print(f"{name:10s} {r['images']:6d} {r['img_s']:6.2f} {r['peak_rss'] / 2**30:8.2f}G "
              f"{r['user']:7.1f} {r['sys']:6.1f} {share:7.0%} {r['minflt']:9d}")
    print(f"\npeak RSS ratio, baseline ({args.baseline_images} images) / ours "
          f"({args.images} images): {base['peak_rss'] / ours['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
