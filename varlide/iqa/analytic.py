"""Our analytic quality measures: cheap, batched, deterministic statistics of a frame.

All are computed on the batch's device at the resolution given, with luma = Rec.601
(``0.299 R + 0.587 G + 0.114 B`` on the stored gamma-encoded values, as everywhere in
varlide) and reductions in float64. Each returns ``(B,)`` float64.

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
    # float32 luma, its float64 copy; sharpness: a Laplacian map and its float64 copy
    # (measured 110 B/px, benchmarks/memory.py)
    bytes_per_pixel = 128

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


def _y(images: torch.Tensor) -> torch.Tensor:
    return luma(images).double().flatten(1)  # (B, N)


@_register(MetricInfo("brightness", None, (0.0, 1.0), description="mean Rec.601 luma"))
def brightness(images: torch.Tensor) -> torch.Tensor:
    return _y(images).mean(dim=1)


@_register(MetricInfo("contrast", False, (0.0, 0.5), description="RMS contrast: std of luma"))
def contrast(images: torch.Tensor) -> torch.Tensor:
    return _y(images).std(dim=1, unbiased=False)


@_register(MetricInfo(
    "entropy", False, (0.0, 8.0), description="Shannon entropy (bits) of the uint8 luma histogram"
))
def entropy(images: torch.Tensor) -> torch.Tensor:
    idx = (luma(images).flatten(1) * 255).round().clamp(0, 255).long()
    hist = torch.zeros(idx.shape[0], 256, dtype=torch.float64, device=idx.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / idx.shape[1]
    return -(p * torch.log2(p.where(p > 0, torch.ones_like(p)))).sum(dim=1)


@_register(MetricInfo(
    "colorfulness", False, (0.0, math.inf),
    description="Hasler & Suesstrunk 2003 colourfulness on the 0-255 scale",
))
def colorfulness(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    x = images.double().flatten(2) * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sd = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mu = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return sd + 0.3 * mu


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@_register(MetricInfo(
    "sharpness", False, (0.0, math.inf),
    description="variance of the 4-neighbour Laplacian of luma (0-255 scale)",
))
def sharpness(images: torch.Tensor) -> torch.Tensor:
    y = luma(images) * 255
    if min(y.shape[-2:]) < 3:
        return torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    k = _LAPLACE.to(y.device, y.dtype).view(1, 1, 3, 3)
    lap = F.conv2d(y, k).double().flatten(1)
    return lap.var(dim=1, unbiased=False)


@_register(MetricInfo(
    "overexposed", True, (0.0, 1.0), description="fraction of pixels with luma >= 0.98"
))
def overexposed(images: torch.Tensor) -> torch.Tensor:
    return (luma(images).flatten(1) >= OVEREXPOSED_LUMA).double().mean(dim=1)
