"""The ``analytic`` prior: visibility v and blur b from image statistics, no weights.

Everything is computed in float32 on the batch's own device, on a working copy of the
luma whose long side is at most ``WORK_SIDE`` (area downscale, never upscaled), so the
cost per image is bounded (a handful of pooling / difference ops and one sort).

Luma (all of varlide): Rec.601, ``Y = 0.299 R + 0.587 G + 0.114 B`` on the stored
(gamma-encoded) values, the luma of JPEG and of pyiqa's ``to_y_channel``.

Visibility v (higher = better lit)::

    m   = mean(min(Y, q98(Y)))          # winsorised mean: a few clipped lamps do not count
    E   = 0.9 * m + 0.1 * q90(Y)        # exposure: mostly the mean, plus the bright tail
    v   = E^K / (E^K + E0^K),  E0 = 0.25, K = 4     # a Hill / log-logistic curve in E

Why: what makes a night frame hard to see is its overall level (the mean); the upper
percentile adds that a frame whose lit part is well exposed is partly visible (with a small
weight: a larger one made lamp-lit night frames, e.g. dev-lowlight 9.png, read as half
visible, and put the curve's output further below its target). The
winsorised mean keeps saturated light sources (1.0 whatever the scene) from inflating m.
The log-logistic map is smooth and strictly increasing (so v is monotone in exposure:
scaling an image by s scales m and the quantiles by s), equals 0.5 at E = 0.25, gives
~0.9 to a well-exposed frame (mean 0.45-0.5: v(0.45) = 0.91) and ~0.01 to a very dark
one (v(0.08) = 0.01). Over-exposed frames get v close to 1 (v(0.9) = 0.994): v says how
*visible* the content is, and a bright frame is visible; over-exposure is measured by the
``overexposed`` quality measure, and ``exposure_from_visibility`` inverts the map so a
curve (``classic-curve``) can still darken such frames. The map is invertible, so
``exposure_from_visibility(v)`` recovers E exactly (up to float precision).

Blur b (higher = blurrier), the re-blur measure of Crete-Roffet et al. 2007 ("The blur
effect", SPIE 6492; also ``skimage.measure.blur_effect``), on a copy of the luma whose long
side is ``min(WORK_SIDE, L / 2)`` for a frame of long side L (area downscale: at least
2x2 pixels averaged; 512 px for any frame of 1024 px and more, so b of a 720p, a 1080p and
a 4K frame of one scene agree)::

    for each axis a in (rows, cols):
        D   = |Y[i] - Y[i-1]| along a                   # variation of the image
        Db  = same on Y low-passed by a 1-D box of H_SIZE = 9 pixels along a
        b_a = sum(D - max(0, D - Db)) / sum(D)          # share of variation a re-blur keeps
    b = max(b_rows, b_cols)

Why: re-blurring a sharp image destroys much of its variation (b small, ~0.2-0.4 for
natural photographs); re-blurring an already blurred one changes little (b -> 1). It is a
ratio of sums of differences, so any affine change of luma ``a Y + c`` (darkening, lower
contrast) leaves b unchanged exactly: no exposure or contrast dependence. The max over the
two axes catches motion blur along one direction. The >= 2x area downscale averages at
least 4 pixels, halving the std of independent sensor noise (noise adds fine variation and
so reads as sharpness) while a blur of a few pixels still shows. An image with no
variation at all (flat) gets b = 1. b is in [0, 1] by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from varlide.priors.base import PRIORS, Prior, PriorScores

MODEL = "analytic-v1"  # bump when a formula or constant below changes
WORK_SIDE = 512
LUMA_601 = (0.299, 0.587, 0.114)
E0 = 0.25
K = 4.0
W_MEAN, W_Q90 = 0.9, 0.1
H_SIZE = 9


def luma(images: torch.Tensor) -> torch.Tensor:
    """Rec.601 luma ``(B, 1, H, W)`` float32 of RGB ``(B, 3, H, W)`` (grey passes through)."""
    x = images.float()
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def downscale_to(y: torch.Tensor, max_side: int) -> torch.Tensor:
    """Area-downscale ``(B, C, H, W)`` so its long side is at most ``max_side``."""
    h, w = y.shape[-2:]
    if max(h, w) <= max_side:
        return y
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(y, size=size, mode="area")


def visibility_from_exposure(e: torch.Tensor) -> torch.Tensor:
    """The log-logistic map E -> v (see module docstring)."""
    e = e.clamp_min(0)
    ek = e.pow(K)
    return ek / (ek + E0**K)


def exposure_from_visibility(v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``visibility_from_exposure``: the exposure statistic E an analytic v means."""
    v = v.float().clamp(1e-6, 1 - 1e-6)
    return E0 * (v / (1 - v)).pow(1 / K)


def quantiles(flat: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Row quantiles ``(len(qs), B)`` of ``(B, N)``, linear interpolation like
    ``torch.quantile`` (which refuses inputs over 2^24 elements: a batch of 64 at 512 px)."""
    s = flat.sort(dim=1).values
    n = s.shape[1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        out.append(s[:, lo] + (s[:, hi] - s[:, lo]) * (pos - lo))
    return torch.stack(out)


def exposure(y: torch.Tensor) -> torch.Tensor:
    """Exposure statistic E ``(B,)`` of luma ``(B, 1, H, W)``."""
    flat = y.flatten(1)
    q90, q98 = quantiles(flat, (0.90, 0.98))
    m = torch.minimum(flat, q98.unsqueeze(1)).mean(dim=1)
    return W_MEAN * m + W_Q90 * q90


def _box1d(y: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Centered box filter of ``size`` along ``dim`` (2 = rows, 3 = cols), edge replicated."""
    lo, hi = (size - 1) // 2, size // 2
    if dim == 3:
        ypad = F.pad(y, (lo, hi, 0, 0), mode="replicate")
        return F.avg_pool2d(ypad, kernel_size=(1, size), stride=1)
    ypad = F.pad(y, (0, 0, lo, hi), mode="replicate")
    return F.avg_pool2d(ypad, kernel_size=(size, 1), stride=1)


def blur_effect(y: torch.Tensor, h_size: int = H_SIZE) -> torch.Tensor:
    """Crete-Roffet blur ``(B,)`` in [0, 1] of luma ``(B, 1, H, W)`` (max over the two axes)."""
    out = []
    for dim in (2, 3):
        if y.shape[dim] < 2:
            continue
        yb = _box1d(y, h_size, dim)
        d = y.diff(dim=dim).abs()
        db = yb.diff(dim=dim).abs()
        kept = d - (d - db).clamp_min(0)  # = min(d, db)
        s_d = d.flatten(1).sum(dim=1)
        s_k = kept.flatten(1).sum(dim=1)
        eps = 1e-12 * d[0].numel()  # a flat image (no variation at all) reads as blurred
        out.append((s_k + eps) / (s_d + eps))
    if not out:
        return torch.ones(y.shape[0], device=y.device)
    return torch.stack(out).amax(dim=0).clamp(0, 1)


class AnalyticPrior(Prior):
    backend = "analytic"
    model = MODEL

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> PriorScores:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        x = images.to(self.device)
        long_side = max(x.shape[-2:])
        y = downscale_to(luma(x), WORK_SIDE)
        v = visibility_from_exposure(exposure(y))
        b = blur_effect(downscale_to(y, max(2, min(WORK_SIDE, long_side // 2))))
        return PriorScores(visibility=v.float(), blur=b.float())


@PRIORS.register("analytic")
def _make_analytic(device: str | torch.device = "cpu", **kw) -> AnalyticPrior:
    if kw:
        raise TypeError(f"analytic prior takes no options, got {sorted(kw)}")
    return AnalyticPrior(device=device)
