"""The backbone slot's stand-in: a noise-adaptive local Wiener (Lee) filter, no weights.

Why: a curve that lifts a dark frame by a local gain g lifts its sensor noise by the same g
(5-10x on night frames), and that amplified noise, not the tone, is most of what separates
a good curve from the reference (``benchmarks/oracle_bounds.py``: +2.7 dB from denoising on
top of the exact tone inversion). VAR-LIDE puts a restoration backbone between the curve and
the phase module; until a learned one exists, this filter fills the slot. It is pure
tensor arithmetic (a 3x3 convolution and separable Gaussian blurs), has no parameters, is
differentiable, and knows how much noise to remove from two things it can measure::

    sigma_in = Immerkaer (1996) fast noise estimate of the *input*, per image and channel:
               sqrt(pi / 2) / 6 * mean |x * L|,  L = [[1,-2,1],[-2,4,-2],[1,-2,1]]
    g(p)     = (G_2(y) + eps) / (G_2(x) + eps)   the curve's local gain (Gaussian sigma 2 px)
    sigma(p) = strength * sigma_in * g(p)        the noise left in the curve output y
    mu, var  = G_w(y), G_w(y^2) - mu^2            local mean and variance (sigma w px)
    out      = mu + max(var - sigma^2, 0) / var * (y - mu)

Flat regions (var close to the noise variance) go to their local mean; edges and texture
(var >> sigma^2) are kept. A frame the curve darkens (g < 1) or barely changes, and a clean
well-lit one (small sigma_in), are left nearly as they are. Computed in float32 whatever
autocast says (the variance is a difference of two close numbers).

Limits: sigma_in is one number per image and channel, so shot noise (stronger in brighter
pixels) is averaged; Immerkaer's estimate reads fine texture as noise too, which costs
real frames some sharpness (measured in docs/METHOD.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from varlide.models.backbones import BACKBONES
from varlide.models.tiling import bands

GAIN_WINDOW = 2.0
EPS = 1e-3


def gaussian_kernel(sigma: float, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ``ceil(3 sigma)`` (at least 1)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def _blur_axis(x: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """1-D filter along ``dim`` (-1 columns, -2 rows), edges replicated, as a sum of shifted
    slices: the same products and sums as the convolution, but on CPU ~12x faster than
    torch's depthwise conv2d (which has no fast kernel for 1-channel groups)."""
    r = (len(taps) - 1) // 2
    n = x.shape[dim]
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    p = F.pad(x, pad, mode="replicate")
    acc = p.narrow(dim, 0, n) * taps[0]
    for i in range(1, len(taps)):
        acc.add_(p.narrow(dim, i, n), alpha=taps[i])  # autograd-safe: add keeps no input
    return acc


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``, radius ``ceil(3 sigma)``, edges replicated."""
    taps = gaussian_kernel(sigma, dtype=x.dtype).tolist()
    return _blur_axis(_blur_axis(x, taps, -1), taps, -2)


def noise_sigma(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Immerkaer's noise standard deviation per image and channel, ``(B, C)``; 0 for images
    smaller than 3x3. ``rows``: filter output rows per band (None: the whole frame at once),
    so a large frame never needs a whole-frame response map.

    The mask is separable (``[1, -2, 1]`` outer itself), so it is computed as two second
    differences of slices rather than a 3x3 convolution (~10x faster on CPU)."""
    b, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.new_zeros(b, c)
    total = torch.zeros(b, c, dtype=torch.float64, device=x.device)
    for r0, r1 in bands(h - 2, rows):  # output row r comes from input rows r .. r + 2
        band = x[:, :, r0:r1 + 2]
        d = band[..., :-2] - 2 * band[..., 1:-1] + band[..., 2:]
        r = d[..., :-2, :] - 2 * d[..., 1:-1, :] + d[..., 2:, :]
        total += r.abs().sum(dim=(2, 3), dtype=torch.float64)
    mean = total / ((h - 2) * (w - 2))
    return (math.sqrt(math.pi / 2) / 6 * mean).to(x.dtype)


def whole_frame_sigma(source: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A backbone's ``prepare``: the per-image noise estimate of the whole input, ``(B, C)``,
    the one global statistic, computed once so the filter itself can run in row bands."""
    with torch.autocast(source.device.type, enabled=False):
        return noise_sigma(source.float(), rows)


def local_gain(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The curve's local gain y / x (Gaussian means over ``GAIN_WINDOW``): how much the
    input's noise was amplified at each pixel."""
    return (gaussian_blur(y, GAIN_WINDOW) + EPS) / (gaussian_blur(x, GAIN_WINDOW) + EPS)


class NoiseAwareBackbone(nn.Module):
    """The shared frame of the denoising backbones: ``prepare`` measures the input's noise
    once (``whole_frame_sigma``), ``forward`` runs in float32 outside autocast and hands
    ``filter`` the curve output, its source and the noise sigma times ``strength``."""

    strength: float = 1.0

    def prepare(self, source: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        return whole_frame_sigma(source, rows)

    def forward(self, image: torch.Tensor, source: torch.Tensor,
                sigma_in: torch.Tensor | None = None) -> torch.Tensor:
        """``sigma_in``: ``prepare(whole input)`` when ``source`` is a band of it."""
        dtype = image.dtype
        with torch.autocast(image.device.type, enabled=False):
            y, x = image.float(), source.float()
            if sigma_in is None:
                sigma_in = noise_sigma(x)
            out = self.filter(y, x, self.strength * sigma_in.float())
        return out.to(dtype)

    def filter(self, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The denoised ``y`` given its source ``x`` and the noise sigma ``(B, C)``."""
        raise NotImplementedError


class NoiseAdaptiveDenoiser(NoiseAwareBackbone):
    """``forward(image, source)``: denoise the curve output ``image`` given the input ``source``
    it came from (see the module docstring). ``window``: w, the Gaussian sigma (px) of the
    local statistics; ``strength``: the factor on the estimated noise."""

    def __init__(self, window: float = 1.5, strength: float = 1.0) -> None:
        super().__init__()
        if window <= 0 or strength < 0:
            raise ValueError(f"denoiser: window must be > 0 and strength >= 0, got {window}, "
                             f"{strength}")
        self.window = float(window)
        self.strength = float(strength)

    def tag(self) -> str:
        return f"denoise-w{self.window:g}-k{self.strength:g}"

    @property
    def halo(self) -> int:
        """Rows either side an output pixel depends on (the widest Gaussian's radius)."""
        return max(math.ceil(3 * GAIN_WINDOW), math.ceil(3 * self.window))

    def filter(self, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        noise_var = (sigma[:, :, None, None] * local_gain(y, x)) ** 2
        mu = gaussian_blur(y, self.window)
        var = (gaussian_blur(y * y, self.window) - mu * mu).clamp_min(0)
        keep = (var - noise_var).clamp_min(0) / var.clamp_min(1e-8)
        return mu + keep * (y - mu)


@BACKBONES.register("denoise")
def _denoise(window: float = 1.5, strength: float = 1.0, **_: object) -> NoiseAdaptiveDenoiser:
    return NoiseAdaptiveDenoiser(window, strength)
