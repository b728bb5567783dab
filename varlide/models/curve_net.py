"""The Zero-DCE curve estimator and the iterated light-enhancement curve (pure torch).

Topology (Zero-DCE, Guo et al. CVPR 2020, "DCE-Net"): seven 3x3 convolutions of ``width``
(32) channels, stride 1, padding 1, ReLU; symmetric skip concatenations
``conv5(cat[x3, x4])``, ``conv6(cat[x2, x5])``, ``conv7(cat[x1, x6])``; ``tanh`` on the
last one, which gives ``3 * n_maps`` maps (three per iteration, one per colour channel) in
[-1, 1]. With width 32 and ``n_maps`` 8 it has 79,416 parameters, the reference's count.

The curve (Zero-DCE's quadratic light-enhancement curve, iterated)::

    E_0 = x,    E_n = E_{n-1} + w_n * A_n * E_{n-1} * (1 - E_{n-1}),   n = 1..N

``A_n`` in [-1, 1] (positive brightens, negative darkens); for ``|w_n A_n| <= 1`` and
``E in [0, 1]`` every step maps [0, 1] into [0, 1] and is increasing in E, so the output
needs no clipping and pixel order is preserved. ``w_n`` (``(B, N)``, in [0, 1]) is the
per-image iteration mask VICM uses for its truncation; ``w = 1`` is plain Zero-DCE.
(The reference code writes ``x + r * (x^2 - x)``, the same curve with ``A = -r``.)

Downscaled estimation (the Zero-DCE++ trick, ``downscale`` > 1): the maps are estimated on
an area-downscaled copy (``1 / downscale`` per side) and upsampled bilinearly to the full
size before the curve is applied at full resolution. The conv cost drops by
``downscale ** 2``; the curve maps are smooth (a TV loss keeps them so), so little is lost.
A model is trained with the ``downscale`` it will run with (content scale per receptive
field); :class:`CurveNet` takes it as a constructor argument and a per-call override.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from varlide.models.tiling import band_rows, bands, bilinear_rows, map_bands, with_halo

N_MAPS = 8
WIDTH = 32
HALO = 7  # seven stacked 3x3 convolutions: an output pixel sees 7 rows either side
# Peak bytes per input pixel of ``CurveNet.estimate`` (fp32, width 32; feature maps, skip
# concatenations and the convolution workspace), and of the full-resolution work per pixel
# once the maps exist (upsampled maps, the curve, a denoiser): measured with
# ``benchmarks/memory.py`` on 1280x720 (the whole-frame peak over the frame's pixels).
ESTIMATE_BYTES_PER_PIXEL = 1600
APPLY_BYTES_PER_PIXEL = 240


class CurveNet(nn.Module):
    """DCE-Net: image ``(B, 3, H, W)`` in [0, 1] -> curve maps ``(B, 3 * n_maps, H, W)``."""

    def __init__(self, n_maps: int = N_MAPS, width: int = WIDTH, downscale: float = 1.0) -> None:
        super().__init__()
        if n_maps < 1 or width < 1:
            raise ValueError(f"n_maps and width must be >= 1, got {n_maps}, {width}")
        if downscale < 1:
            raise ValueError(f"downscale must be >= 1 (1 = full resolution), got {downscale}")
        self.n_maps = int(n_maps)
        self.width = int(width)
        self.downscale = float(downscale)

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, 1, 1, bias=True)

        self.conv1 = conv(3, width)
        self.conv2 = conv(width, width)
        self.conv3 = conv(width, width)
        self.conv4 = conv(width, width)
        self.conv5 = conv(2 * width, width)
        self.conv6 = conv(2 * width, width)
        self.conv7 = conv(2 * width, 3 * n_maps)

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """The maps at the resolution of ``x`` (no rescaling), NCHW.

        On CPU the convolutions run channels-last (oneDNN's NHWC kernels: ~30 % faster for
        these 32-channel layers on the 2-core AVX-512 dev box, same values to ~5e-7);
        on CUDA the caller picks the layout (``VarlideLite(channels_last=...)``)."""
        if x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last):
            return self._estimate(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self._estimate(x)

    def _estimate(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.conv1(x))
        x2 = F.relu(self.conv2(x1))
        x3 = F.relu(self.conv3(x2))
        x4 = F.relu(self.conv4(x3))
        x5 = F.relu(self.conv5(torch.cat([x3, x4], 1)))
        x6 = F.relu(self.conv6(torch.cat([x2, x5], 1)))
        return torch.tanh(self.conv7(torch.cat([x1, x6], 1)))

    def forward(self, x: torch.Tensor, downscale: float | None = None) -> torch.Tensor:
        """Maps ``(B, 3N, H, W)`` for ``x``; with ``downscale`` > 1 estimated on a smaller copy."""
        k = self.downscale if downscale is None else float(downscale)
        h, w = x.shape[-2:]
        if k <= 1:
            return self.estimate(x)
        small = (max(1, round(h / k)), max(1, round(w / k)))
        xs = F.interpolate(x, size=small, mode="area")
        maps = self.estimate(xs)
        return F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)


def apply_curves(
    x: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Iterate the curve with maps ``(B, 3N, H, W)`` and per-image masks ``weights`` (B, N).

    Computed in float32 (maps from a bf16 autocast region are upcast), returned as float32.
    ``weights=None`` applies all N iterations. ``maps`` may hold fewer than N triples when
    the iterations past them have weight 0 for every image (``used_iterations``).
    Without autograd the same products are formed in two scratch buffers (no allocation
    per iteration: 8 iterations at 720p were ~40 full-frame temporaries).
    """
    n = maps.shape[1] // 3
    if maps.shape[1] != 3 * n or x.shape[1] != 3:
        raise ValueError(f"expected 3-channel images and 3N maps, got {x.shape} and "
                         f"{maps.shape}")
    if torch.is_grad_enabled() and (x.requires_grad or maps.requires_grad or (
            weights is not None and weights.requires_grad)):
        return _apply_curves_autograd(x.float(), maps.float(), weights)
    e = x.float().clone()
    term, rest = torch.empty_like(e), torch.empty_like(e)
    for i in range(n):
        a_i = maps[:, 3 * i : 3 * i + 3].float()
        if weights is not None:
            torch.mul(a_i, weights[:, i].to(a_i.dtype).view(-1, 1, 1, 1), out=term)
            term.mul_(e)
        else:
            torch.mul(a_i, e, out=term)
        torch.sub(1, e, out=rest)
        e.add_(term.mul_(rest))  # e + (w A) e (1 - e), the same products in the same order
    return e


def _apply_curves_autograd(x: torch.Tensor, a: torch.Tensor,
                           weights: torch.Tensor | None) -> torch.Tensor:
    e = x
    for i in range(a.shape[1] // 3):
        a_i = a[:, 3 * i : 3 * i + 3]
        if weights is not None:
            a_i = a_i * weights[:, i].to(a_i.dtype).view(-1, 1, 1, 1)
        e = e + a_i * e * (1 - e)
    return e


def used_iterations(weights: torch.Tensor | None, n_maps: int) -> int:
    """How many leading iterations have a non-zero weight for some image (a hard VICM mask
    zeroes the rest: they change nothing, so their maps need not be upsampled or applied)."""
    if weights is None:
        return n_maps
    nonzero = (weights != 0).any(dim=0).nonzero()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


Post = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GOOD_BAND_ROWS = 128  # bands thinner than this spend too much on halos and small ops


def images_per_call(batch: int, width: int, downscale: float, workspace: int | None) -> int:
    """How many images of a batch ``curve_in_bands`` should take at once so that its
    full-resolution bands are at least ``GOOD_BAND_ROWS`` high (all of them: no budget)."""
    if not workspace:
        return batch
    per_pixel = APPLY_BYTES_PER_PIXEL + (ESTIMATE_BYTES_PER_PIXEL if downscale <= 1 else 0)
    return int(max(1, min(batch, workspace // (width * GOOD_BAND_ROWS * per_pixel))))


def curve_in_bands(
    net: CurveNet,
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    post: Post | None = None,
    post_halo: int = 0,
    downscale: float | None = None,
    workspace: int | None = None,
) -> torch.Tensor:
    """``post(apply_curves(x, net(x, downscale), weights), x)`` in row bands (inference).

    ``workspace``: bytes the working tensors of one band may take (None: whole frames, one
    call). Maps on a reduced copy (``downscale`` > 1) are estimated once (in bands of the
    small copy when it is large) and upsampled band by band; full-resolution maps are
    estimated per band with the curve net's halo. ``post`` is a local operator (the
    backbone slot) whose output rows depend on inputs within ``post_halo`` rows. Float32
    out; equal to the whole-frame path up to float noise (``varlide.models.tiling``).
    """
    k = net.downscale if downscale is None else float(downscale)
    b, _, h, w = x.shape
    used = 3 * used_iterations(weights, net.n_maps)
    if weights is not None:
        weights = weights[:, :used // 3]
    small = None
    if k > 1:
        size = (max(1, round(h / k)), max(1, round(w / k)))
        xs = F.interpolate(x, size=size, mode="area")
        rows = band_rows(b, size[1], ESTIMATE_BYTES_PER_PIXEL, workspace, HALO)
        small = map_bands(net.estimate, xs, rows, HALO)[:, :used]
        per_pixel, halo = APPLY_BYTES_PER_PIXEL, post_halo
    else:
        per_pixel, halo = ESTIMATE_BYTES_PER_PIXEL + APPLY_BYTES_PER_PIXEL, post_halo + HALO
    rows = band_rows(b, w, per_pixel, workspace, halo)
    out: torch.Tensor | None = None
    for r0, r1 in bands(h, rows):
        lo, hi = with_halo(r0, r1, h, post_halo)
        if small is not None and (lo, hi) == (0, h):
            maps = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        elif small is not None:
            maps = bilinear_rows(small, (h, w), lo, hi)
        else:
            elo, ehi = with_halo(lo, hi, h, HALO)
            maps = net.estimate(x[:, :, elo:ehi])[:, :used, lo - elo:hi - elo]
        xb = x[:, :, lo:hi]
        y = apply_curves(xb, maps, weights)
        if post is not None:
            y = post(y, xb)
        if lo == 0 and hi == h:
            return y.float()
        if out is None:
            out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device)
        out[:, :, r0:r1] = y[:, :, r0 - lo:r1 - lo]
    return out
