"""Non-local means in the backbone slot: a denoiser that keeps the detail the Lee filter loses.

Why: the local Wiener filter (``denoise``) shrinks every pixel towards the mean of a
Gaussian window around it, so texture and edges whose local variance is not far above the
noise are flattened too (-29 % brightness-normalised sharpness on very dark real frames),
and each channel is filtered on its own, so coloured noise stays. Non-local means (Buades,
Coll & Morel 2005) averages a pixel only with pixels whose *neighbourhoods* look alike,
anywhere in a search window: along an edge, not across it. The patch distance is taken over
the three channels at once, so one set of weights averages R, G and B alike, which is what
removes the chroma noise. The noise level comes from the same two measurements as the Lee
filter's (``varlide.models.denoise``), so the filter is as noise-adaptive as it is::

    sigma^2(p) = mean_c (strength * sigma_in_c * g_c(p))^2     the noise left in the output y
    d(p, o)    = mean_c mean_{|q| <= P} (y(p+q) - y(p+q+o))^2   joint colour patch distance
    s(p, o)    = (sigma^2(p) + sigma^2(p+o)) / 2                d's noise floor is 2 s
    w(p, o)    = exp(-max(d - 2 s, 0) / (h^2 s))                0 < |o|_inf <= S
    w(p, 0)    = max_o w(p, o)                                  (the usual self weight)
    out(p)     = sum_o w(p, o) y(p+o) / sum_o w(p, o)

``sigma_in`` is Immerkaer's estimate of the input's noise, ``g`` the curve's local gain
(``GAIN_WINDOW``). A clean input (sigma_in ~ 0) gives weight ~0 to every patch that differs
at all, so the frame comes back unchanged. w is symmetric (w(p, o) = w(p+o, -o)), so only
half of the (2S+1)^2 - 1 offsets' distances are computed, each once, on a frame grown by S:
the cost is ~2 S (2S+1) passes of a few full-frame tensor operations, memory a few frames
(one offset at a time, never a tensor per offset). Pure tensor arithmetic, differentiable,
float32 whatever autocast says; edges replicated, so a row band with ``halo`` rows of
context either side gives the whole frame's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from varlide.models.backbones import BACKBONES
from varlide.models.denoise import GAIN_WINDOW, NoiseAwareBackbone, local_gain

#: The smallest noise variance a weight is scaled by (a clean frame: only exact matches count).
MIN_VAR = 1e-10


def noise_variance(y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)``: the channel-mean variance of the noise the curve output ``y`` carries,
    ``sigma`` ``(B, C)`` (the input's noise, times the strength) times the local gain y / x."""
    return (sigma[:, :, None, None] * local_gain(y, x)).square().mean(dim=1, keepdim=True)


def _box_valid(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over a (2r+1)^2 window, 'valid' (the output is 2r smaller each way): shifted
    slices added, two 1-D passes (the fast path of denoise's ``_blur_axis``)."""
    for dim in (-1, -2):
        n = x.shape[dim] - 2 * r
        acc = x.narrow(dim, 0, n).clone()
        for i in range(1, 2 * r + 1):
            acc.add_(x.narrow(dim, i, n))  # autograd-safe: add keeps no input
        x = acc
    return x


def half_offsets(search: int) -> list[tuple[int, int]]:
    """One offset of each ``+-o`` pair of the (2S+1)^2 window, the centre excluded."""
    return [(dy, dx) for dy in range(search + 1) for dx in range(-search, search + 1)
            if dy > 0 or dx > 0]


def nl_means(y: torch.Tensor, var: torch.Tensor, patch: int, search: int,
             h: float) -> torch.Tensor:
    """The module docstring's ``out`` for ``y`` ``(B, C, H, W)`` and the noise variance map
    ``var`` ``(B, 1, H, W)``: offsets visited in +-pairs, sums accumulated one pair at a time."""
    s, p = search, patch
    _, c, hh, ww = y.shape
    r = 2 * s + p  # patches of the grown frame, shifted by o
    yp = F.pad(y, (r, r, r, r), mode="replicate")
    vp = F.pad(var, (2 * s,) * 4, mode="replicate")
    he, we = hh + 2 * s, ww + 2 * s  # E: the frame grown by s, where w(., o) is needed
    base = yp[..., s:s + he + 2 * p, s:s + we + 2 * p]
    v_e = vp[..., s:s + he, s:s + we]
    scale = 1.0 / (c * (2 * p + 1) ** 2)
    num = torch.zeros_like(y)
    den = y.new_zeros(var.shape)
    wmax = y.new_zeros(var.shape)
    for dy, dx in half_offsets(s):
        diff = base - yp[..., s + dy:s + dy + he + 2 * p, s + dx:s + dx + we + 2 * p]
        d = _box_valid(diff.square().sum(dim=1, keepdim=True), p) * scale
        v = ((v_e + vp[..., s + dy:s + dy + he, s + dx:s + dx + we]) * 0.5).clamp_min(MIN_VAR)
        w = torch.exp((2 * v - d).clamp_max(0) / (h * h * v))
        w_fwd = w[..., s:s + hh, s:s + ww]  # w(p, o)
        w_bwd = w[..., s - dy:s - dy + hh, s - dx:s - dx + ww]  # w(p - o, o) = w(p, -o)
        num = num + w_fwd * yp[..., r + dy:r + dy + hh, r + dx:r + dx + ww] \
            + w_bwd * yp[..., r - dy:r - dy + hh, r - dx:r - dx + ww]
        den = den + w_fwd + w_bwd
        wmax = torch.maximum(wmax, torch.maximum(w_fwd, w_bwd))
    wmax = wmax.clamp_min(1e-6)  # no similar patch at all: the pixel keeps itself
    return (num + wmax * y) / (den + wmax)


class NonLocalMeansDenoiser(NoiseAwareBackbone):
    """``forward(image, source)``: non-local means on the curve output ``image`` at the noise
    level measured on ``source`` (module docstring). ``patch``: P (patches (2P+1)^2);
    ``search``: S (offsets up to S px each way); ``h``: the weight's bandwidth in noise
    units; ``strength``: the factor on the estimated noise (the Lee filter's ``strength``)."""

    def __init__(self, patch: int = 1, search: int = 3, h: float = 0.8,
                 strength: float = 1.0) -> None:
        super().__init__()
        if patch < 0 or search < 1 or h <= 0 or strength < 0:
            raise ValueError(f"nlm: need patch >= 0, search >= 1, h > 0, strength >= 0; got "
                             f"{patch}, {search}, {h}, {strength}")
        self.patch, self.search = int(patch), int(search)
        self.h, self.strength = float(h), float(strength)

    def tag(self) -> str:
        k = f"-k{self.strength:g}" if self.strength != 1.0 else ""
        return f"nlm-p{self.patch}-s{self.search}-h{self.h:g}{k}"

    @property
    def halo(self) -> int:
        """Rows either side an output row depends on: the search, then the patch or the
        gain's Gaussian around the pixel found."""
        return self.search + max(self.patch, math.ceil(3 * GAIN_WINDOW))

    def filter(self, y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return nl_means(y, noise_variance(y, x, sigma), self.patch, self.search, self.h)


@BACKBONES.register("nlm")
def _nlm(patch: int = 1, search: int = 3, h: float = 0.8, strength: float = 1.0,
         **_: object) -> NonLocalMeansDenoiser:
    return NonLocalMeansDenoiser(patch, search, h, strength)
