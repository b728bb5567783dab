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

BACKBONES = ("identity", "denoise")
IMMERKAER = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))
GAIN_WINDOW = 2.0
EPS = 1e-3


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)``, radius ``ceil(3 sigma)``, edges replicated."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    row, col = k.view(1, 1, 1, -1).expand(c, 1, 1, -1), k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), row, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), col, groups=c)


def noise_sigma(x: torch.Tensor) -> torch.Tensor:
    """Immerkaer's noise standard deviation per image and channel, ``(B, C)``; 0 for images
    smaller than 3x3."""
    b, c, h, w = x.shape
    if h < 3 or w < 3:
        return x.new_zeros(b, c)
    mask = torch.tensor(IMMERKAER, device=x.device, dtype=x.dtype).view(1, 1, 3, 3)
    r = F.conv2d(x.reshape(b * c, 1, h, w), mask)
    return (math.sqrt(math.pi / 2) / 6 * r.abs().mean(dim=(1, 2, 3))).view(b, c)


class NoiseAdaptiveDenoiser(nn.Module):
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

    def forward(self, image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        dtype = image.dtype
        with torch.autocast(image.device.type, enabled=False):
            y, x = image.float(), source.float()
            sigma = self.strength * noise_sigma(x)[:, :, None, None]
            gain = (gaussian_blur(y, GAIN_WINDOW) + EPS) / (gaussian_blur(x, GAIN_WINDOW) + EPS)
            noise_var = (sigma * gain) ** 2
            mu = gaussian_blur(y, self.window)
            var = (gaussian_blur(y * y, self.window) - mu * mu).clamp_min(0)
            keep = (var - noise_var).clamp_min(0) / var.clamp_min(1e-8)
            out = mu + keep * (y - mu)
        return out.to(dtype)


class IdentityBackbone(nn.Module):
    """The empty slot: returns the curve output unchanged."""

    def tag(self) -> str:
        return ""

    def forward(self, image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return image


def build_backbone(name: str, window: float = 1.5, strength: float = 1.0) -> nn.Module:
    """The module for a backbone-slot name (one of :data:`BACKBONES`)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if name == "denoise":
        return NoiseAdaptiveDenoiser(window, strength)
    return IdentityBackbone()
