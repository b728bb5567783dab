"""The blind deblurring stage (``varlide.models.deblur``) against the truth and the oracle.

On the motion-blur-only evaluation set (``paired_synthetic(degradation="blur")``: the
bundled photographs, 5-21 px line kernels, no darkening, no noise but 8-bit quantisation),
per image: the kernel similarity of the blind estimate to the true kernel (max normalised
cross-correlation), its length error, and PSNR against the sharp reference of the input, the
blind deconvolution, the gated output (what the stage returns) and the *oracle*: the same
non-blind deconvolution with the true kernel (the ceiling a perfect estimate reaches). Then
seconds per 1280x720 frame on this CPU. The baseline is the input (no stage); the ratio
printed last is gated PSNR - input PSNR and the oracle's, in dB.

    PYTHONPATH=. .venv/bin/python benchmarks/deblur.py [--seeds 2] [--opt key=value ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean().clamp_min(1e-12)))


def _padded(k: np.ndarray, size: int) -> torch.Tensor:
    out = torch.zeros(1, size, size)
    n = min(k.shape[0], size)
    o, c = (size - n) // 2, (k.shape[0] - n) // 2
    out[0, o:o + n, o:o + n] = torch.from_numpy(k[c:c + n, c:c + n])
    return out


def quality(stage, seeds: int) -> list[dict]:
    from varlide.evaluation import paired_synthetic, true_kernel
    from varlide.models.deblur import deconvolve, kernel_similarity, noise_sigma

    s = stage.settings
    rows = []
    for item in paired_synthetic(seeds=tuple(range(seeds)), degradation="blur").items:
        low, ref = item.load()
        x = torch.from_numpy(low).permute(2, 0, 1)[None]
        c = torch.from_numpy(ref).permute(2, 0, 1)[None]
        k = true_kernel(item)
        r = stage(x)
        mu = s.mu + s.mu_noise * noise_sigma(x).mean(dim=1).square()
        blind = deconvolve(x, r.kernels, mu, s.tv_steps).clamp(0, 1)  # scale 1 at 256 px
        oracle = deconvolve(x, torch.from_numpy(k)[None], mu, s.tv_steps).clamp(0, 1)
        rows.append(dict(
            image=item.id, length=item.meta["kernel_length"],
            est_length=float(r.kernel_px[0]), decision=r.decision[0],
            similarity=float(kernel_similarity(r.kernels, _padded(k, s.kernel_size))[0]),
            input=_psnr(x, c), blind=_psnr(blind, c), gated=_psnr(r.images, c),
            oracle=_psnr(oracle, c)))
        print("{image:28s} L{length:2d} est {est_length:5.1f} sim {similarity:.3f} "
              "{decision:8s} input {input:.2f} blind {blind:.2f} gated {gated:.2f} "
              "oracle {oracle:.2f}".format(**rows[-1]), flush=True)
    return rows


def speed(stage, repeats: int = 3) -> float:
    x = torch.rand(1, 3, 720, 1280)
    stage(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--opt", nargs="*", default=[], help="DeblurSettings overrides key=value")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from varlide.models.deblur import BlindDeblur, DeblurSettings

    opts = {k: type(getattr(DeblurSettings(), k))(v) for k, v in
            (o.split("=", 1) for o in args.opt)}
    stage = BlindDeblur(DeblurSettings(**opts))
    rows = quality(stage, args.seeds)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in
            ("similarity", "input", "blind", "gated", "oracle")}
    err = float(np.mean([abs(r["est_length"] - r["length"]) for r in rows]))
    applied = sum(r["decision"] == "applied" for r in rows)
    worse = sum(r["gated"] < r["input"] - 0.01 for r in rows)
    sec = speed(stage)
    print("\n| settings | images | kernel similarity | length error px | input dB | blind dB "
          "| gated dB | oracle dB | applied | gated worse than input | s / 1280x720 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {stage.tag()} | {len(rows)} | {mean['similarity']:.3f} | {err:.1f} | "
          f"{mean['input']:.2f} | {mean['blind']:.2f} | {mean['gated']:.2f} | "
          f"{mean['oracle']:.2f} | {applied} | {worse} | {sec:.2f} |")
    print(f"\nratio (dB over the input, no stage): gated {mean['gated'] - mean['input']:+.2f}, "
          f"oracle ceiling {mean['oracle'] - mean['input']:+.2f}")


if __name__ == "__main__":
    main()
