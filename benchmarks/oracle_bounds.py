"""Upper bounds on the paired synthetic set for global tone curves that *know* the reference.

    .venv/bin/python benchmarks/oracle_bounds.py [--seeds 3]

Issue 3's bar (the learned enhancer >= 2 dB PSNR over ``zero-dce`` on the paired set) is
only meaningful next to what a global curve can reach at all. For every pair of
``paired_synthetic`` (the demo-corpus degradation ``exposure * (k * x) ** gamma + n``) this
prints the mean PSNR of:

- ``input``: the degraded image;
- ``gamma -> 0.45``: ``x ** p`` with p chosen so the mean luma is 0.45 (no reference: a
  fixed-target global curve, what a zero-reference exposure loss aims at);
- ``oracle gamma``: ``x ** p`` with the mean luma matched to the reference's;
- ``oracle gain``: ``g * x`` with the mean luma matched to the reference's;
- ``oracle gain*gamma``: ``a * x ** p`` with (a, p) fitted to the reference by least squares
  (the best two-parameter global curve);
- ``... + denoise``: the same after a Gaussian blur (sigma 1 px) of the input.

The oracles use the clean image, so no zero-reference method can be expected to reach them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def _luma(x: np.ndarray) -> float:
    return float((0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).mean())


def _power_for_mean(x: np.ndarray, target: float) -> float:
    lo, hi = 0.02, 1.0
    for _ in range(40):
        p = (lo + hi) / 2
        lo, hi = (lo, p) if _luma(x**p) < target else (p, hi)
    return (lo + hi) / 2


def _best_gain_power(x: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize

    def mse(t):
        a, p = np.exp(t)
        return float(np.mean((np.clip(a * x**p, 0, 1) - clean) ** 2))

    fits = [minimize(mse, [np.log(a0), np.log(p0)], method="Nelder-Mead")
            for a0 in (1, 3, 10) for p0 in (0.5, 1.0)]
    return tuple(np.exp(min(fits, key=lambda r: r.fun).x))


def main(argv=None) -> None:
    from scipy.ndimage import gaussian_filter

    from varlide.evaluation import paired_synthetic

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    rows: dict[str, list[float]] = {}
    items = paired_synthetic(seeds=tuple(range(args.seeds))).items
    for item in items:
        low, clean = item.load()
        x = np.clip(low, 1e-4, 1)
        smooth = np.clip(gaussian_filter(x, (1, 1, 0)), 1e-4, 1)
        a, pw = _best_gain_power(x, clean)
        got = {
            "input": _psnr(low, clean),
            "gamma -> 0.45": _psnr(x ** _power_for_mean(x, 0.45), clean),
            "oracle gamma": _psnr(x ** _power_for_mean(x, _luma(clean)), clean),
            "oracle gain": _psnr(np.clip(x * _luma(clean) / max(_luma(x), 1e-4), 0, 1), clean),
            "oracle gain*gamma": _psnr(np.clip(a * x**pw, 0, 1), clean),
            "oracle gain*gamma + denoise": _psnr(np.clip(a * smooth**pw, 0, 1), clean),
        }
        for k, v in got.items():
            rows.setdefault(k, []).append(v)
    print(f"paired_synthetic, {len(items)} pairs; PSNR dB mean +- std")
    for k, v in rows.items():
        print(f"  {k:30s} {np.mean(v):6.2f} +- {np.std(v):.2f}")


if __name__ == "__main__":
    main()
