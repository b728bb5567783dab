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

import torch
import torch.nn.functional as F
from torch import nn

N_MAPS = 8
WIDTH = 32


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
        """The maps at the resolution of ``x`` (no rescaling)."""
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
    ``weights=None`` applies all N iterations.
    """
    e = x.float()
    a = maps.float()
    n = a.shape[1] // 3
    if a.shape[1] != 3 * n or x.shape[1] != 3:
        raise ValueError(f"expected 3-channel images and 3N maps, got {x.shape} and {a.shape}")
    for i in range(n):
        a_i = a[:, 3 * i : 3 * i + 3]
        if weights is not None:
            a_i = a_i * weights[:, i].to(a_i.dtype).view(-1, 1, 1, 1)
        e = e + a_i * e * (1 - e)
    return e
