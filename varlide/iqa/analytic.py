"""Our analytic quality measures: cheap, batched, deterministic statistics of a frame.

All are computed on the batch's device at the resolution given, with luma = Rec.601
(``0.299 R + 0.587 G + 0.114 B`` on the stored gamma-encoded values, as everywhere in
varlide) and reductions in float64, as sums over bands of rows (bounded memory at any frame
size; means and standard deviations from the sums of x and x^2). Each returns ``(B,)``
float64.

- ``brightness``: mean luma, in [0, 1]. No preferred direction (a curve can over-brighten).
- ``contrast``: RMS contrast = population standard deviation of luma, in [0, 0.5].
- ``entropy``: Shannon entropy (bits) of the 256-bin histogram of luma quantised as uint8
  (``round(255 Y)``), in [0, 8]; matches ``skimage.measure.shannon_entropy`` of that image.
- ``colorfulness``: Hasler & Suesstrunk 2003 on the 0-255 scale, so the paper's bands apply
  (<15 not colourful, ~33 moderately, >59 quite, >109 extremely):
  ``rg = R - G, yb = (R + G) / 2 - B, M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2)``.
- ``sharpness``: variance of the 3x3 Laplacian (4-neighbour) of luma on the 0-255 scale,
  valid region only (the OpenCV ``Laplacian(gray).var()`` focus measure; its usual "blurry"
  threshold is ~100). Absolute, not contrast-normalised (unlike the prior's b): brightening
  a dark frame raises it, and it depends on resolution, so compare at equal sizes.
- ``overexposed``: fraction of pixels whose luma is >= 0.98 (250/255 and up), in [0, 1].
  Luma, not "any channel": a saturated red sign is not a blown highlight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from varlide.iqa.base import METRICS, Metric, MetricInfo
from varlide.priors.analytic import luma

OVEREXPOSED_LUMA = 0.98


class AnalyticMetric(Metric):
    # Reductions over row bands of BAND_BYTES (``_band_sums``): the per-pixel cost is the
    # float32 copy of the input the caller passes (measured ~6 B/px, benchmarks/memory.py).
    bytes_per_pixel = 8

    def __init__(
        self,
        info: MetricInfo,
        fn: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device = "cpu",
    ) -> None:
        self.info = info
        self.fn = fn
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        return self.fn(images.to(self.device).float()).double()


def _register(info: MetricInfo):
    def wrap(fn: Callable[[torch.Tensor], torch.Tensor]):
        def factory(device: str | torch.device = "cpu", **kw) -> AnalyticMetric:
            if kw:
                raise TypeError(f"metric {info.name!r} takes no options, got {sorted(kw)}")
            return AnalyticMetric(info, fn, device)

        factory.info = info
        METRICS.register(info.name)(factory)
        return fn

    return wrap


BAND_BYTES = 8 << 20  # working tensors of one band of rows (float32 luma + float64 copies)


def _band_sums(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
               halo: int = 0) -> torch.Tensor:
    """``sum over row bands of fn(band)`` -> ``(B, K)`` float64 sums.

    Why: a statistic of a whole frame at float64 costs ~50-110 bytes per pixel at once (a
    4K frame: ~1 GB); as sums over bands of rows it costs ``BAND_BYTES``. Every measure here
    is a function of such sums (counts, moments, a histogram). ``halo``: rows a 'valid'
    filter needs below its last output row (output row r reads input rows r .. r + halo).
    The sums are the same numbers in another order: results agree with one whole-frame
    reduction to float64 rounding (~1e-12 relative)."""
    b, _, h, w = images.shape
    rows = max(8, BAND_BYTES // max(1, b * w * 48))
    total: torch.Tensor | None = None
    for r0 in range(0, max(0, h - halo), rows):
        part = fn(images[:, :, r0:min(h, r0 + rows + halo)])
        total = part if total is None else total + part
    return total


def _luma_moments(band: torch.Tensor) -> torch.Tensor:
    y = luma(band).double().flatten(1)
    return torch.stack([y.sum(dim=1), (y * y).sum(dim=1)], dim=1)


def _moments_std(s: torch.Tensor, n: int, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, population std) from the sums ``s[:, i]`` (x) and ``s[:, i + 1]`` (x^2)."""
    mean = s[:, i] / n
    return mean, (s[:, i + 1] / n - mean * mean).clamp_min(0).sqrt()


@_register(MetricInfo("brightness", None, (0.0, 1.0), description="mean Rec.601 luma"))
def brightness(images: torch.Tensor) -> torch.Tensor:
    return _band_sums(images, _luma_moments)[:, 0] / images[0, 0].numel()


@_register(MetricInfo("contrast", False, (0.0, 0.5), description="RMS contrast: std of luma"))
def contrast(images: torch.Tensor) -> torch.Tensor:
    return _moments_std(_band_sums(images, _luma_moments), images[0, 0].numel())[1]


def _histogram(band: torch.Tensor) -> torch.Tensor:
    idx = (luma(band).flatten(1) * 255).round().clamp(0, 255).long()
    hist = torch.zeros(idx.shape[0], 256, dtype=torch.float64, device=idx.device)
    return hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


@_register(MetricInfo(
    "entropy", False, (0.0, 8.0), description="Shannon entropy (bits) of the uint8 luma histogram"
))
def entropy(images: torch.Tensor) -> torch.Tensor:
    p = _band_sums(images, _histogram) / images[0, 0].numel()
    return -(p * torch.log2(p.where(p > 0, torch.ones_like(p)))).sum(dim=1)


def _opponent_moments(band: torch.Tensor) -> torch.Tensor:
    x = band.double().flatten(2) * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return torch.stack([rg.sum(1), (rg * rg).sum(1), yb.sum(1), (yb * yb).sum(1)], dim=1)


@_register(MetricInfo(
    "colorfulness", False, (0.0, math.inf),
    description="Hasler & Suesstrunk 2003 colourfulness on the 0-255 scale",
))
def colorfulness(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    s, n = _band_sums(images, _opponent_moments), images[0, 0].numel()
    mu_rg, sd_rg = _moments_std(s, n, 0)
    mu_yb, sd_yb = _moments_std(s, n, 2)
    return torch.sqrt(sd_rg**2 + sd_yb**2) + 0.3 * torch.sqrt(mu_rg**2 + mu_yb**2)


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _laplace_moments(band: torch.Tensor) -> torch.Tensor:
    y = luma(band) * 255
    k = _LAPLACE.to(y.device, y.dtype).view(1, 1, 3, 3)
    lap = F.conv2d(y, k).double().flatten(1)
    return torch.stack([lap.sum(dim=1), (lap * lap).sum(dim=1)], dim=1)


@_register(MetricInfo(
    "sharpness", False, (0.0, math.inf),
    description="variance of the 4-neighbour Laplacian of luma (0-255 scale)",
))
def sharpness(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    if min(h, w) < 3:
        return torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    s = _band_sums(images, _laplace_moments, halo=2)
    return _moments_std(s, (h - 2) * (w - 2))[1] ** 2


def _overexposed_count(band: torch.Tensor) -> torch.Tensor:
    return (luma(band).flatten(1) >= OVEREXPOSED_LUMA).sum(dim=1, keepdim=True).double()


@_register(MetricInfo(
    "overexposed", True, (0.0, 1.0), description="fraction of pixels with luma >= 0.98"
))
def overexposed(images: torch.Tensor) -> torch.Tensor:
    return _band_sums(images, _overexposed_count)[:, 0] / images[0, 0].numel()
