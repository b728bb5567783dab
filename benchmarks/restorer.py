"""The learned restorer against the weight-free blind route, on well-lit motion-blurred frames.

Sets (paired; the reference is the sharp photograph):
- ``synthetic-blur``: ``paired_synthetic(degradation="blur")``, the bundled photographs,
  256x256 crops, straight-line kernels 5-21 px, 8-bit (the set of ``benchmarks/deblur.py``);
- ``sice-blur``: the held-out train-sice photographs (the one held-out rule, never trained
  on) with mean luma 0.25-0.6, 256 px, blurred by ``varlide.demo.blur_pair`` (lines and
  random trajectories, 3-23 px, light noise), one seed per image;
- ``synthetic-sharp``: nothing to fix: a stage must leave them alone (psnr against the input
  >= 35 dB counts as unchanged);
- ``--split``: the held-out SICE pairs four ways (noisy / clean x lines / trajectories), the
  input and the ungated learned route only: what is denoising and what is deblurring.

Rows: the input (no stage, the baseline), the blind route as shipped (gated), the learned
route ungated and gated. Per row: mean psnr / ssim, frames worse than the input, frames
changed, and seconds per 1280x720 frame on this CPU. The ratio printed last is the dB gain
of the gated learned route over the input on each blurred set.

    PYTHONPATH=. .venv/bin/python benchmarks/restorer.py --weights OUT/final \
        [--data ../shared/data] [--seeds 2]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean().clamp_min(1e-12)))


def _pairs(data: str | None, seeds: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    from varlide.evaluation import paired_synthetic

    def tensors(low, ref):
        return (torch.from_numpy(low).permute(2, 0, 1)[None].float(),
                torch.from_numpy(ref).permute(2, 0, 1)[None].float())

    sets = {}
    for preset in ("blur", "sharp"):
        items = paired_synthetic(seeds=tuple(range(seeds)), degradation=preset).items
        sets[f"synthetic-{preset}"] = [tensors(*it.load()) for it in items]
    sice = os.path.join(data or "", "train-sice")
    if data and os.path.isdir(sice):
        sets["sice-blur"] = _sice_pairs(sice)
    return sets


def _split_sets(data: str) -> dict[str, list]:
    """``--split``: the held-out SICE pairs four ways (noise on / off x straight lines /
    random trajectories), to tell what a restorer gains from denoising and from deblurring."""
    sice = os.path.join(data, "train-sice")
    out = {}
    for noise in (True, False):
        for traj in (0.0, 1.0):
            name = f"sice-{'noisy' if noise else 'clean'}-{'traj' if traj else 'lines'}"
            out[name] = _sice_pairs(sice, noise=noise, trajectory_prob=traj)
    return out


def _sice_pairs(sice: str, noise: bool = True, trajectory_prob: float = 0.5) -> list:
    import torch.nn.functional as F
    from PIL import Image

    from varlide.demo import blur_pair
    from varlide.holdout import split_corpus

    out = []
    for i, rel in enumerate(sorted(split_corpus(sice)[1])):
        with Image.open(os.path.join(sice, rel)) as im:
            t = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        t = F.interpolate(t[None].float() / 255, size=(256, 256), mode="bilinear",
                          antialias=True, align_corners=False)[0].clamp(0, 1)
        clean = (t * 255).round() / 255
        if not 0.25 <= float(clean.mean()) <= 0.6:
            continue
        clean_hwc = np.ascontiguousarray(clean.permute(1, 2, 0).numpy())
        low, _ = blur_pair(clean_hwc, np.random.default_rng([7, i]), sharp_prob=0.0,
                           noise=noise, trajectory_prob=trajectory_prob)
        out.append((torch.from_numpy(low).permute(2, 0, 1)[None], clean[None]))
    return out


def _stages(weights: str):
    from varlide.models.deblur import BlindDeblur
    from varlide.models.varlide_lite import deblur_stage

    return {
        "input (no stage)": None,
        "blind (weight-free, gated)": BlindDeblur(),
        "learned, ungated": deblur_stage({"method": "learned", "weights": weights,
                                          "gate": False}),
        "learned, gated": deblur_stage({"method": "learned", "weights": weights}),
    }


def _measure(stage, pairs) -> dict[str, float]:
    from varlide.evaluation.ssim import SeparableSSIM

    ssim = SeparableSSIM()
    ps, ss, worse, changed, applied = [], [], 0, 0, 0
    for low, ref in pairs:
        if stage is None:
            out = low
        else:
            r = stage(low)
            out, applied = r.images.clamp(0, 1), applied + (r.decision[0] == "applied")
        p_in, p = _psnr(low, ref), _psnr(out, ref)
        ps.append(p)
        ss.append(float(ssim(out, ref).mean()))
        worse += p < p_in - 0.01
        changed += _psnr(out, low) < 35
    return {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "worse": worse,
            "changed": changed, "applied": applied, "n": len(pairs)}


def _speed(stage) -> float:
    from benchmarks._common import median_seconds

    if stage is None:
        return 0.0
    x = torch.rand(1, 3, 720, 1280) * 0.5 + 0.2
    return median_seconds(lambda: stage(x), x.device, iters=1, warmup=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="restorer weights (OUT/final of "
                   "`varlide train DATA OUT --enhancer restorer`)")
    p.add_argument("--data", default=None, help="../shared/data (adds sice-blur)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--split", action="store_true", help="only the input and the ungated "
                   "learned route, on the held-out SICE pairs split by noise and kernel kind")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = _stages(args.weights)
    if args.split:
        if not args.data:
            p.error("--split needs --data")
        sets = _split_sets(args.data)
        stages = {k: v for k, v in stages.items() if k in ("input (no stage)",
                                                           "learned, ungated")}
    else:
        sets = _pairs(args.data, args.seeds)
    print("| set | stage | images | psnr | ssim | applied | worse than input | changed "
          "| s / 1280x720 |")
    print("|---|---|---|---|---|---|---|---|---|")
    results: dict[tuple[str, str], dict] = {}
    speeds = {name: _speed(stage) for name, stage in stages.items()}
    for set_name, pairs in sets.items():
        for name, stage in stages.items():
            m = results[set_name, name] = _measure(stage, pairs)
            print(f"| {set_name} | {name} | {m['n']} | {m['psnr']:.2f} | {m['ssim']:.4f} | "
                  f"{m['applied']} | {m['worse']} | {m['changed']} | {speeds[name]:.2f} |",
                  flush=True)
    row = "learned, ungated" if args.split else "learned, gated"
    gains = ", ".join(
        f"{s} {results[s, row]['psnr'] - results[s, 'input (no stage)']['psnr']:+.2f}"
        for s in sets if "blur" in s or args.split)
    print(f"\nratio ({row} - input, dB): {gains}")


if __name__ == "__main__":
    main()
