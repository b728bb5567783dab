"""Enhancer throughput: images/s of each module and of the whole ``varlide-lite`` enhancer.

Runs on a bare GPU machine (only torch is imported at module level; varlide's model modules
are pure torch and imported inside ``main``)::

    PYTHONPATH=. python benchmarks/enhancer.py                       # 1280x720, CUDA if any
    PYTHONPATH=. python benchmarks/enhancer.py --device cpu --size 160x96 --batch 4
    PYTHONPATH=. python benchmarks/enhancer.py --compile \
        --weights varlide/models/shipped/varlide-lite

Stages (each on random frames of ``--size``):
  curve net      Zero-DCE curve estimator + 8 curve iterations (the ANCHORS.md reference)
  curve net /k   the same with maps estimated on a 1/k copy (``--downscale``, Zero-DCE++)
  VICM           curve net + Theta_v + truncated iterations
  denoise        the backbone slot's noise-adaptive filter (varlide.models.denoise)
  VGPM           rfft2, phase estimator, T = 8 recursion, irfft2
  FFT round trip rfft2 + amplitude/phase + polar + irfft2 (VGPM's floor)
  varlide-lite   the whole enhancer via ``enhance()`` (every image on route 'full': VICM,
                 denoise, VGPM), and /k

Modes: ``reference`` = fp32, one image at a time (the reference implementation's way);
``fp32 batched``; ``bf16 cl`` = bf16 autocast + channels_last, batched; ``bf16 cl compile``
(with ``--compile``). The last column is the ratio to ``reference`` of the same stage.
A correctness check compares the whole enhancer's bf16 output with its fp32 output.
Timing: CUDA events around ``--iters`` calls after ``--warmup`` calls, median of 3 repeats.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import median_seconds as _time  # noqa: E402


def _autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def build_models(args, device: torch.device):
    from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

    if args.weights:
        lite = VarlideLite.from_pretrained(args.weights)
    else:
        torch.manual_seed(0)
        lite = VarlideLite(VarlideLiteConfig(backbone="denoise"))
        with torch.no_grad():  # an active VGPM (an untrained one is the identity)
            lite.vgpm.theta_b.net[-1].bias.fill_(0.5)
            for p in lite.vgpm.psi_p.parameters():
                p.normal_(0, 0.05)
    return lite.to(device).eval()


def stage_fns(lite, device: torch.device, k: float):
    """name -> fn(x, v, b, bf16) for each module."""
    from varlide.models.curve_net import apply_curves
    from varlide.models.denoise import NoiseAdaptiveDenoiser

    curve = lite.vicm.curve
    denoiser = NoiseAdaptiveDenoiser()

    def curve_net(x, v, b, bf16, down=1.0):
        with _autocast(device, bf16):
            maps = curve(x, downscale=down)
        return apply_curves(x, maps)

    def vicm(x, v, b, bf16):
        with _autocast(device, bf16):
            return lite.vicm(x, v, mask="hard")["image"]

    def denoise(x, v, b, bf16):
        with _autocast(device, bf16):  # computes in float32 whatever autocast says
            return denoiser(x, x * 0.25)

    def vgpm(x, v, b, bf16):
        with _autocast(device, bf16):
            return lite.vgpm(x, b)["image"]

    def fft(x, v, b, bf16):
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        amp, ph = spec.abs(), torch.angle(spec)
        return torch.fft.irfft2(torch.polar(amp, ph), s=x.shape[-2:], norm="ortho")

    return {
        "curve net": curve_net,
        f"curve net /{k:g}": lambda x, v, b, bf16: curve_net(x, v, b, bf16, down=k),
        "VICM": vicm,
        "denoise": denoise,
        "VGPM": vgpm,
        "FFT round trip": fft,
    }


def enhancer_fn(lite, k: float | None, precision: str, channels_last: bool, compile: bool,
                backbone: str | None = None):
    lite.set_inference(skip_visibility=None, full_blur=0.0, precision=precision,
                       channels_last=channels_last, compile=compile, downscale=k,
                       backbone=backbone)

    def fn(x, v, b, bf16):
        return lite.enhance(x, v, b).images

    return fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (both when CUDA)")
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--downscale", type=float, default=4.0, help="k of the /k rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--weights", default=None, help="a varlide-lite weights folder")
    p.add_argument("--stages", default="all", help="comma list of stage names, or all")
    p.add_argument("--backbone", choices=("identity", "denoise"), default=None,
                   help="varlide-lite's backbone slot (default: the weights' own; random "
                   "weights: denoise)")
    args = p.parse_args(argv)
    w, h = (int(t) for t in args.size.lower().split("x"))
    if args.device == "auto":
        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        devices = [args.device]

    rows: list[tuple[str, str, str, int, float, float]] = []
    checks: list[str] = []
    for dev_name in devices:
        device = torch.device(dev_name)
        torch.manual_seed(0)
        lite = build_models(args, device)
        x_all = (torch.rand(args.batch, 3, h, w, device=device) * 0.3).contiguous()
        v_all = torch.rand(args.batch, device=device) * 0.5
        b_all = torch.rand(args.batch, device=device) * 0.5 + 0.5

        stages = stage_fns(lite, device, args.downscale)
        stages["varlide-lite"] = None
        stages[f"varlide-lite /{args.downscale:g}"] = None
        wanted = None if args.stages == "all" else {s.strip() for s in args.stages.split(",")}
        for name, fn in stages.items():
            if wanted and name not in wanted:
                continue
            k = args.downscale if name.endswith(f"/{args.downscale:g}") else None
            modes = [("reference", 1, False, False, False), ("fp32 batched", args.batch,
                      False, False, False), ("bf16 cl", args.batch, True, True, False)]
            if args.compile:
                modes.append(("bf16 cl compile", args.batch, True, True, True))
            ref_rate = None
            for mode, bs, bf16, cl, comp in modes:
                x, v, b = x_all[:bs], v_all[:bs], b_all[:bs]
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                if name.startswith("varlide-lite"):
                    run = enhancer_fn(lite, k, "bf16" if bf16 else "fp32", cl, comp,
                                      args.backbone)
                else:
                    if cl:
                        lite.to(memory_format=torch.channels_last)
                    else:
                        lite.to(memory_format=torch.contiguous_format)
                    run = torch.compile(fn) if comp else fn
                iters = max(1, args.iters if bs > 1 else args.iters * 2)
                try:
                    sec = _time(lambda run=run, x=x, v=v, b=b, bf16=bf16: run(x, v, b, bf16),
                                device, iters, args.warmup)
                except Exception as exc:  # report, keep benchmarking the rest
                    print(f"[{dev_name}] {name} / {mode}: failed: {type(exc).__name__}: {exc}")
                    continue
                rate = bs / sec
                ref_rate = ref_rate or rate
                rows.append((dev_name, name, mode, bs, rate, rate / ref_rate))
                print(f"[{dev_name}] {name:22s} {mode:16s} batch {bs:3d}: {rate:9.1f} img/s",
                      flush=True)
            lite.to(memory_format=torch.contiguous_format)

        # correctness: bf16 (+ channels_last) vs fp32, whole enhancer
        with torch.inference_mode():
            x, v, b = x_all[:2], v_all[:2], b_all[:2]
            ref = enhancer_fn(lite, None, "fp32", False, False, args.backbone)(x, v, b, False)
            low = enhancer_fn(lite, None, "bf16", True, False, args.backbone)(
                x.contiguous(memory_format=torch.channels_last), v, b, True)
            diff = (low.float() - ref.float()).abs()
            ok = diff.mean().item() < 2 / 255 and diff.max().item() < 0.1
            checks.append(f"[{dev_name}] bf16 vs fp32, whole enhancer: mean |diff| "
                          f"{diff.mean().item():.5f}, max {diff.max().item():.4f} -> "
                          f"{'OK' if ok else 'MISMATCH'}")

    print()
    print(f"frames {w}x{h}; reference = fp32, one image at a time; ratio = img/s / reference")
    print("| device | stage | mode | batch | img/s | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for dev, name, mode, bs, rate, ratio in rows:
        print(f"| {dev} | {name} | {mode} | {bs} | {rate:.1f} | {ratio:.2f}x |")
    print()
    for line in checks:
        print(line)
    return 0 if all(line.endswith("OK") for line in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
