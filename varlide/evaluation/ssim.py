"""``ssim`` as pyiqa computes it, with its Gaussian window applied as two 1-D passes."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from varlide.iqa.base import Metric, metric_info

log = logging.getLogger(__name__)


class SeparableSSIM(Metric):
    """pyiqa's ``ssim`` (Y of YIQ rounded to 0..255, 11x11 Gaussian, sigma 1.5, 'valid',
    no downsampling, float64) with the Gaussian window applied as two 1-D passes of
    shifted sums (float64 ``conv2d`` has no fast CPU kernel). The statistics of the last
    reference tensor are kept (it must not be changed in place between calls), so scoring
    several outputs against one reference costs 3 filterings each instead of 5."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from pyiqa.archs.func_util import preprocess_rgb
        from pyiqa.matlab_utils import fspecial

        self.info = metric_info("ssim")
        self.device = torch.device(device)
        self._pre = preprocess_rgb
        win = fspecial(11, 1.5, 1)[0, 0].double()  # pyiqa's window (float32, normalised)
        self._g = win.sum(dim=1).tolist()  # its separable factor: the window is g g^T
        self._ref: torch.Tensor | None = None
        self._ref_stats: tuple[torch.Tensor, ...] = ()

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self._g)
        for dim in (2, 3):
            n = x.shape[dim] - k + 1
            acc = x.narrow(dim, 0, n) * self._g[0]
            for j in range(1, k):
                acc.add_(x.narrow(dim, j, n), alpha=self._g[j])
            x = acc
        return x

    def _y(self, images: torch.Tensor) -> torch.Tensor:
        return self._pre(images.to(self.device).float(), True, 255, "yiq").double()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None):
        if reference is None:
            raise ValueError("metric 'ssim' needs a reference image")
        if images.shape != reference.shape:
            raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
        if min(images.shape[-2:]) < len(self._g):
            raise ValueError(f"ssim needs images of at least {len(self._g)} px a side")
        if reference is not self._ref:  # the same tensor object (held here, so never reused)
            y = self._y(reference)
            mu2 = self._filter(y)
            self._ref_stats = (y, mu2, mu2 * mu2, self._filter(y * y) - mu2 * mu2)
            self._ref = reference
        y, mu2, mu2_sq, s2 = self._ref_stats
        x = self._y(images)
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        mu1 = self._filter(x)
        mu1_sq, mu12 = mu1 * mu1, mu1 * mu2
        s1 = self._filter(x * x) - mu1_sq
        s12 = self._filter(x * y) - mu12
        cs = F.relu((2 * s12 + c2) / (s1 + s2 + c2))
        return (((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs).mean(dim=(1, 2, 3))


