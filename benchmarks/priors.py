"""Prior throughput: images/s of the ``analytic`` and ``clip`` priors, on CPU and on CUDA.

Runs on a bare GPU machine (only torch and open_clip are imported at module level; varlide's
priors are imported inside ``main``)::

    PYTHONPATH=. python benchmarks/priors.py                      # CPU, and CUDA when present
    PYTHONPATH=. python benchmarks/priors.py --devices cuda --batch 256 --model ViT-B-16
    PYTHONPATH=. python benchmarks/priors.py --pretrained ViT-B-32:openai   # cached weights

Without ``--pretrained`` the CLIP model is random-initialised: the same architecture and
shapes, so the same speed (its scores are meaningless; no weights are needed or fetched).
Rows, each on random ``--size`` frames already on the device (as the engine hands them over):

  analytic          ``AnalyticPrior.score`` (luma, 512 px working copy, quantiles, blur)
  clip              ``ClipPrior.score`` end to end: on-device resize + crop + normalise,
                    image tower (bf16 autocast on CUDA), similarities to the cached prompt
                    embeddings, pair softmax, ensemble mean
  clip fp32         the same without autocast (CUDA only)
  clip tower 224    the image tower alone on 224 px input (the ANCHORS.md figure)

The last column is the ratio to ``analytic`` on the same device. Timing: CUDA events (or
``perf_counter`` on CPU) around ``--iters`` calls after ``--warmup``, median of 3 repeats.
"""

from __future__ import annotations

import argparse
import os
import sys

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import median_seconds as _time  # noqa: E402


def _clip_prior(args: argparse.Namespace, device: torch.device, precision: str):
    from varlide.priors.clip import ClipPrior, load_clip

    if args.pretrained:
        loaded = load_clip(args.pretrained, device)
        model, tok, pre, label = loaded.model, loaded.tokenizer, loaded.preprocess, loaded.label
    else:
        from varlide.priors.clip import _preprocess_of

        model = open_clip.create_model(args.model, device=device).eval()
        tok, pre = open_clip.get_tokenizer(args.model), _preprocess_of(model, {})
        label = f"{args.model} (random init)"
    return ClipPrior(model, tok, pre, label, device=device, precision=precision,
                     max_batch=max(args.batch, 1))


def bench_device(args: argparse.Namespace, device: torch.device) -> list[tuple]:
    from varlide.priors.analytic import AnalyticPrior

    w, h = args.size
    batch = args.batch if device.type == "cuda" else args.cpu_batch
    iters = args.iters if device.type == "cuda" else args.cpu_iters
    g = torch.Generator(device="cpu").manual_seed(0)
    frames = torch.rand(batch, 3, h, w, generator=g).to(device)
    rows = []
    analytic = AnalyticPrior(device)
    t = _time(lambda: analytic.score(frames), device, iters, args.warmup)
    rows.append((str(device), "analytic", batch, f"{w}x{h}", batch / t))
    modes = ["auto", "fp32"] if device.type == "cuda" else ["fp32"]
    for mode in modes:
        prior = _clip_prior(args, device, mode)
        t = _time(lambda p=prior: p.score(frames), device, iters, args.warmup)
        name = f"clip {prior.model}" + (" fp32" if mode == "fp32" and device.type == "cuda"
                                        else "")
        rows.append((str(device), name, batch, f"{w}x{h}", batch / t))
    size = prior.pre.size
    x224 = torch.rand(batch, 3, *size, generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def tower():
        if dtype is not None:
            with torch.autocast("cuda", dtype=dtype):
                return prior.net.encode_image(x224)
        return prior.net.encode_image(x224)

    t = _time(tower, device, iters, args.warmup)
    rows.append((str(device), f"clip tower {size[0]} px" + (" bf16" if dtype else ""), batch,
                 f"{size[1]}x{size[0]}", batch / t))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="auto", help="cpu, cuda, or auto (= cpu + cuda if any)")
    p.add_argument("--size", default="1280x720", help="frame WxH")
    p.add_argument("--batch", type=int, default=256, help="CUDA batch")
    p.add_argument("--cpu-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="CUDA calls per repeat")
    p.add_argument("--cpu-iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    p.add_argument("--pretrained", help="a prior_model with its weights in the cache instead")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
             "cpu": ["cpu"], "cuda": ["cuda"]}[args.devices]
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"CPU threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(f"{'device':7} {'prior':42} {'batch':>5} {'size':>9} {'img/s':>10} {'x analytic':>10}")
    for name in names:
        rows = bench_device(args, torch.device(name))
        base = rows[0][4]
        for dev, what, batch, size, ips in rows:
            print(f"{dev:7} {what[:42]:42} {batch:5d} {size:>9} {ips:10.1f} {ips / base:10.2f}")


if __name__ == "__main__":
    main()
