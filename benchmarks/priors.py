"""Prior throughput: images/s of the ``analytic`` and ``clip`` priors, on CPU and on CUDA;
with ``--vlm``, of the VLM priors ``qinstruct`` and ``qrealign``, batched against the
reference scripts' loops (GPP-LLIE: one image and one prompt per forward; pyiqa's
``qrealign``: one image per forward), the ratio last.

Runs on a bare GPU machine (only torch and open_clip are imported at module level; varlide's
priors are imported inside ``main``)::

    PYTHONPATH=. python benchmarks/priors.py                      # CPU, and CUDA when present
    PYTHONPATH=. python benchmarks/priors.py --devices cuda --batch 256 --model ViT-B-16
    PYTHONPATH=. python benchmarks/priors.py --pretrained ViT-B-32:openai   # cached weights
    PYTHONPATH=. python benchmarks/priors.py --vlm --devices cpu              # tiny VLMs
    PYTHONPATH=. python benchmarks/priors.py --vlm --devices cuda  # LLaVA-1.5 7B, Qwen3.5 0.8B

The VLMs are random-initialised at the released sizes on CUDA (bf16; the cost of real
weights) and tiny on CPU (transformers needed; images/s then measure the per-call overhead
batching removes, not a model's cost).

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


# --------------------------------------------------------------------------- the VLM priors


def _loaded_qinstruct(full: bool, device: torch.device, dtype: torch.dtype):
    from varlide.priors.clip import Preprocess
    from varlide.priors.qinstruct import CLIP_MEAN, CLIP_STD, LoadedLlava
    from varlide.priors.random_vlm import LLAVA_7B, TINY_LLAVA, random_llava

    model, tok = random_llava(LLAVA_7B if full else TINY_LLAVA)
    model = model.to(device, dtype)
    side = int(model.config.vision_config.image_size)
    pre = Preprocess(size=(side, side), mean=CLIP_MEAN, std=CLIP_STD)
    precision = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    return LoadedLlava(model, tok, pre, "llava-1.5-7b (random init)" if full else "tiny", precision)


def _loaded_qrealign(full: bool, device: torch.device, dtype: torch.dtype):
    from varlide.priors.qrealign import LoadedQReAlign, level_token_ids
    from varlide.priors.random_vlm import QWEN35_08B, TINY_QWEN, random_qwen35

    model, proc = random_qwen35(QWEN35_08B if full else TINY_QWEN, sensitive=False)
    proc.tokenizer.padding_side = "left"
    ids = torch.tensor(level_token_ids(proc.tokenizer), device=device)
    label = "qwen3.5-vl-0.8b (random init)" if full else "tiny"
    return LoadedQReAlign(model.to(device, dtype), proc, ids, label, dtype)


def _qinstruct_one_at_a_time(prior, frames: torch.Tensor) -> None:
    """GPP-LLIE's loop: one image and one prompt per forward."""
    from varlide.priors.clip import preprocess
    from varlide.priors.qinstruct import PROMPT_NAMES, PROMPTS, build_prompt_batch

    whole = prior.batch
    tok = prior.loaded_tokenizer
    singles = [build_prompt_batch(tok, [PROMPTS[n]], prior.n_image,
                                  tok.pad_token_id or 0).to(prior.device) for n in PROMPT_NAMES]
    try:
        for i in range(frames.shape[0]):
            pixels = preprocess(frames[i:i + 1], prior.pre)
            for single in singles:
                prior.batch = single
                prior.prompt_scores(pixels)
    finally:
        prior.batch = whole


def _qrealign_one_at_a_time(prior, frames: torch.Tensor) -> None:
    """pyiqa's loop: one image per forward (and one prompt)."""
    for i in range(frames.shape[0]):
        prior.attribute_scores(frames[i:i + 1])


def bench_vlm(args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """(device, backend, way, batch, images/s) of qinstruct and qrealign: ours (images x
    prompts batched) and the reference scripts' loop, on random weights (full size on CUDA
    unless --vlm-tiny; tiny on CPU)."""
    from varlide.priors.qinstruct import QInstructPrior
    from varlide.priors.qrealign import QReAlignPrior

    full = device.type == "cuda" and not args.vlm_tiny
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w, h = args.size
    batch = args.vlm_batch
    g = torch.Generator(device="cpu").manual_seed(0)
    frames = (torch.rand(batch, 3, h, w, generator=g) * 255).round().div(255).to(device)
    rows = []
    loaded = _loaded_qinstruct(full, device, dtype)
    prior = QInstructPrior(loaded, device, max_batch=batch)
    prior.loaded_tokenizer = loaded.tokenizer
    for way, fn in (("batched", lambda: prior.score(frames)),
                    ("one image, one prompt", lambda: _qinstruct_one_at_a_time(prior, frames))):
        t = _time(fn, device, args.vlm_iters, 1)
        rows.append((str(device), f"qinstruct {loaded.label}", way, batch, batch / t))
    del prior, loaded
    loaded = _loaded_qrealign(full, device, dtype)
    prior = QReAlignPrior(loaded, device, max_batch=batch)
    for way, fn in (("batched", lambda: prior.score(frames)),
                    ("one image at a time", lambda: _qrealign_one_at_a_time(prior, frames))):
        t = _time(fn, device, args.vlm_iters, 1)
        rows.append((str(device), f"qrealign {loaded.label}", way, batch, batch / t))
    return rows


def _print_vlm(rows: list[tuple], size: tuple[int, int]) -> None:
    print(f"{'device':7} {'prior':40} {'way':22} {'batch':>5} {'img/s':>9}  (input "
          f"{size[0]}x{size[1]})")
    for dev, what, way, batch, ips in rows:
        print(f"{dev:7} {what[:40]:40} {way:22} {batch:5d} {ips:9.3f}")
    for i in range(0, len(rows), 2):
        print(f"ratio batched / reference loop, {rows[i][1]}: {rows[i][4] / rows[i + 1][4]:.2f}x")


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
    p.add_argument("--vlm", action="store_true", help="the VLM priors (qinstruct, qrealign) "
                   "instead: batched against the reference scripts' loops")
    p.add_argument("--vlm-tiny", action="store_true", help="tiny VLMs on CUDA too")
    p.add_argument("--vlm-batch", type=int, default=4)
    p.add_argument("--vlm-iters", type=int, default=2)
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
             "cpu": ["cpu"], "cuda": ["cuda"]}[args.devices]
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, "
          f"CPU threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    if args.vlm:
        for name in names:
            _print_vlm(bench_vlm(args, torch.device(name)), args.size)
        return
    print(f"{'device':7} {'prior':42} {'batch':>5} {'size':>9} {'img/s':>10} {'x analytic':>10}")
    for name in names:
        rows = bench_device(args, torch.device(name))
        base = rows[0][4]
        for dev, what, batch, size, ips in rows:
            print(f"{dev:7} {what[:42]:42} {batch:5d} {size:>9} {ips:10.1f} {ips / base:10.2f}")


if __name__ == "__main__":
    main()
