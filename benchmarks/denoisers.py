r"""Denoisers for the backbone slot: quality on paired sets, detail and noise on real frames, speed.

Every denoiser gets the same input: the shipped ``varlide-lite`` curve with its slot emptied
(``backbone="identity"``, full path, the analytic prior's v and b), so a row measures only
the filter. Rows: ``none`` (the curve alone), ``denoise`` (the local Wiener / Lee filter,
shipped), ``nlm`` (non-local means, ``varlide/models/nlm.py``) at its defaults and its fast
setting, and the maintained library implementations where importable (OpenCV
``fastNlMeansDenoisingColored``, scikit-image ``denoise_nl_means``) as references; those
two are told the curve output's own noise level (Immerkaer's estimate), which they need.

Measures: PSNR (RGB, range 1) and SSIM (``SeparableSSIM``, pyiqa's) against the clean
reference; ``sharp``: brightness-normalised sharpness, mean |grad luma| / mean luma,
relative to the reference's (paired sets) or to the ``none`` row's (dev-lowlight, no
reference); ``noise``: Immerkaer's noise sigma of the output (dev-lowlight, x 255); and
seconds per 1280x720 frame on CPU (median of 3, torch threads ``--threads``)::

    PYTHONPATH=. .venv/bin/python benchmarks/denoisers.py
    PYTHONPATH=. .venv/bin/python benchmarks/denoisers.py --extra "nlm:search=4,h=0.6"

Sets: ``paired_synthetic(seeds=(0, 1, 2))``; with ``DATA/train-sice``, the trainer's
held-out images (``holdout.split_corpus``) as pseudo-references (limit 16, 256 px); with
``DATA/dev-lowlight``, its real frames (long side ``--dev-max-side``). The last lines
compare ``nlm`` with the Lee filter measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (curve output, input)
LEE, OURS = "denoise (Lee, shipped)", "nlm (default)"


def _torch_denoiser(name: str, **options) -> Denoiser:
    from varlide.models.backbones import build_backbone

    module = build_backbone(name, **options)
    return lambda y, x: module(y, x).clamp(0, 1)


def _library_denoisers() -> dict[str, Denoiser]:
    """OpenCV's and scikit-image's NLM where importable, at the curve output's noise level
    (one sigma per image: what they take), their documented settings."""
    from varlide.models.denoise import noise_sigma

    out: dict[str, Denoiser] = {}

    def per_image(fn):
        def run(y, x):
            imgs = y.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            sig = noise_sigma(y.float()).mean(dim=1).tolist()
            res = [fn(np.ascontiguousarray(im), s) for im, s in zip(imgs, sig, strict=True)]
            return torch.from_numpy(np.stack(res)).permute(0, 3, 1, 2).to(y)
        return run

    try:
        import cv2

        def opencv(im, s):  # h ~ the noise sigma on the 0-255 scale (OpenCV's tutorial)
            u8 = (im * 255 + 0.5).astype(np.uint8)
            h = max(1.0, 255 * s)
            return cv2.fastNlMeansDenoisingColored(u8, None, h, h, 7, 21) / np.float32(255)

        out["opencv fastNlMeansDenoisingColored (7/21)"] = per_image(opencv)
    except ImportError:
        pass
    try:
        from skimage.restoration import denoise_nl_means

        def skimage_nlm(im, s):  # h = 0.8 sigma with sigma given (its gallery's setting)
            return denoise_nl_means(im, patch_size=5, patch_distance=6, h=0.8 * s, sigma=s,
                                    fast_mode=True, channel_axis=-1).astype(np.float32)

        out["skimage denoise_nl_means (5/6)"] = per_image(skimage_nlm)
    except ImportError:
        pass
    return out


def _parse_extra(text: str) -> dict[str, Denoiser]:
    """``"nlm:search=4,h=0.6;denoise:window=2"`` -> extra rows (for tuning)."""
    out = {}
    for spec in filter(None, (t.strip() for t in text.split(";"))):
        name, _, opts = spec.partition(":")
        kw = {k: float(v) if "." in v else int(v)
              for k, v in (o.split("=") for o in opts.split(",") if o)}
        out[spec] = _torch_denoiser(name, **kw)
    return out


def denoisers(extra: str = "", libraries: bool = True) -> dict[str, Denoiser]:
    out = {"none": lambda y, x: y, LEE: _torch_denoiser("denoise"),
           OURS: _torch_denoiser("nlm"), "nlm (fast: search 2)": _torch_denoiser("nlm", search=2)}
    out.update(_parse_extra(extra))
    if libraries:
        out.update(_library_denoisers())
    return out


def sharpness(img: torch.Tensor) -> float:
    """Mean gradient magnitude of Rec.601 luma over its mean (noise raises it too)."""
    from varlide.priors.analytic import luma

    y = luma(img.float())
    gx, gy = y[..., :-1, 1:] - y[..., :-1, :-1], y[..., 1:, :-1] - y[..., :-1, :-1]
    return float((gx * gx + gy * gy).sqrt().mean() / y.mean().clamp_min(1e-6))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / max(float(((a - b) ** 2).mean()), 1e-12))


def paired_sets(data_root: str, seeds: tuple[int, ...], limit: int) -> list:
    from varlide.evaluation import paired_from_folder, paired_synthetic
    from varlide.holdout import split_corpus

    sets = [paired_synthetic(seeds=seeds)]
    sice = os.path.join(data_root, "train-sice")
    if os.path.isdir(sice):
        sets.append(paired_from_folder(sice, split_corpus(sice)[1], limit=limit, max_side=256,
                                       name="sice-paired"))
    return sets


class Curve:
    """The shipped curve with an empty slot, and the analytic prior's v, b for it."""

    def __init__(self) -> None:
        from varlide.models.base import create_enhancer
        from varlide.priors.base import create_prior

        self.model = create_enhancer("varlide-lite", skip_visibility=None, full_blur=0.0,
                                     backbone="identity")
        self.prior = create_prior("analytic")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.prior.score(x)
        return self.model.enhance(x, s.visibility, s.blur).images.float()


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()


def measure_paired(eset, curve: Curve, dns: dict[str, Denoiser]) -> dict[str, dict]:
    """Mean psnr, ssim and sharpness / reference's of each denoiser on one paired set."""
    from varlide.evaluation import SeparableSSIM

    ssim = SeparableSSIM()
    acc: dict[str, dict[str, list]] = {n: {"psnr": [], "ssim": [], "sharp": []} for n in dns}
    for item in eset.items:
        low, clean = item.load()
        x, ref = _tensor(low), _tensor(clean)
        y = curve(x)
        ref_sharp = sharpness(ref)
        for name, fn in dns.items():
            with torch.inference_mode():
                out = fn(y, x).clamp(0, 1)
            acc[name]["psnr"].append(psnr(out, ref))
            acc[name]["ssim"].append(float(ssim(out, ref)[0]))
            acc[name]["sharp"].append(sharpness(out) / ref_sharp)
    return {n: {k: statistics.fmean(v) for k, v in m.items()} for n, m in acc.items()}


def measure_real(folder: str, max_side: int | None, curve: Curve,
                 dns: dict[str, Denoiser]) -> dict[str, dict]:
    """dev-lowlight (no reference): sharpness relative to the curve alone, output noise."""
    from varlide.evaluation import unpaired_folder
    from varlide.models.denoise import noise_sigma

    acc: dict[str, dict[str, list]] = {n: {"sharp": [], "noise": []} for n in dns}
    for item in unpaired_folder(folder, "dev-lowlight", max_side=max_side).items:
        x = _tensor(item.load()[0])
        y = curve(x)
        base = sharpness(y)
        for name, fn in dns.items():
            with torch.inference_mode():
                out = fn(y, x).clamp(0, 1)
            acc[name]["sharp"].append(sharpness(out) / base)
            acc[name]["noise"].append(255 * float(noise_sigma(out).mean()))
    return {n: {k: statistics.fmean(v) for k, v in m.items()} for n, m in acc.items()}


def seconds_per_frame(fn: Denoiser, size: tuple[int, int] = (1280, 720)) -> float:
    """Median of 3 calls on a random dark frame lifted 4x, after one warm-up call."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size[1], size[0], generator=g) * 0.15
    y = (x * 4).clamp(0, 1)
    runs = []
    with torch.inference_mode():
        fn(y[..., :64, :64], x[..., :64, :64])
        for _ in range(3):
            t = time.perf_counter()
            fn(y, x)
            runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def table(names: list[str], paired: dict[str, dict], real: dict | None,
          secs: dict[str, float]) -> str:
    """Markdown: one row per denoiser, per set psnr / ssim / sharp, then real, then time."""
    head = ["denoiser"]
    for s in paired:
        head += [f"{s} psnr", f"{s} ssim", f"{s} sharp/ref"]
    if real is not None:
        head += ["dev-lowlight sharp/none", "dev-lowlight noise (x255)"]
    head.append("s / 1280x720 frame")
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for n in names:
        row = [n]
        for s in paired.values():
            row += [f"{s[n]['psnr']:.2f}", f"{s[n]['ssim']:.4f}", f"{s[n]['sharp']:.3f}"]
        if real is not None:
            row += [f"{real[n]['sharp']:.3f}", f"{real[n]['noise']:.2f}"]
        row.append(f"{secs[n]:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparison(paired: dict[str, dict], real: dict | None, secs: dict[str, float]) -> str:
    """The headline, ours against the Lee filter of the same run."""
    parts = [f"time x{secs[OURS] / max(secs[LEE], 1e-9):.2f} ({secs[OURS]:.3f} s vs "
             f"{secs[LEE]:.3f} s per 1280x720 frame)"]
    for s, m in paired.items():
        parts.append(f"{s} psnr {m[OURS]['psnr'] - m[LEE]['psnr']:+.2f} dB, ssim "
                     f"{m[OURS]['ssim'] - m[LEE]['ssim']:+.4f}, sharp/ref "
                     f"{m[OURS]['sharp']:.3f} vs {m[LEE]['sharp']:.3f}")
    if real is not None:
        parts.append(f"dev-lowlight sharp/none {real[OURS]['sharp']:.3f} vs "
                     f"{real[LEE]['sharp']:.3f}, noise {real[OURS]['noise']:.2f} vs "
                     f"{real[LEE]['noise']:.2f}")
    return f"{OURS} vs {LEE}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--seeds", default="0,1,2", help="synthetic set seeds")
    p.add_argument("--limit", type=int, default=16, help="held-out train-sice images")
    p.add_argument("--dev-max-side", type=int, default=512, help="0: stored size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--extra", default="", help='more rows, e.g. "nlm:search=4,h=0.6"')
    p.add_argument("--no-libraries", action="store_true", help="leave out OpenCV/skimage")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:
        pass
    t0 = time.time()
    dns = denoisers(args.extra, not args.no_libraries)
    curve = Curve()
    paired = {s.name: measure_paired(s, curve, dns)
              for s in paired_sets(args.data_root, tuple(int(v) for v in args.seeds.split(",")),
                                   args.limit)}
    dev = os.path.join(args.data_root, "dev-lowlight")
    real = (measure_real(dev, args.dev_max_side or None, curve, dns)
            if os.path.isdir(dev) else None)
    secs = {n: seconds_per_frame(fn) for n, fn in dns.items()}
    print(f"torch threads {torch.get_num_threads()}, {time.time() - t0:.0f} s in all")
    print(table(list(dns), paired, real, secs))
    print(comparison(paired, real, secs))


if __name__ == "__main__":
    main()
