"""Row bands with halos: local operators on frames too big to process at once (pure torch).

Why: the curve net keeps ~1.4 KB of feature maps and convolution workspace per pixel, so a
batch of 720p frames or one 4K frame needs more memory than a CPU worker has. Every
full-resolution stage of the enhancers is *local*: an output pixel depends only on input
pixels within ``halo`` rows of it (the curve net: 7 stacked 3x3 convolutions, halo 7; the
denoiser's Gaussian windows: halo 6; the curve itself: halo 0). Such a stage run on the
rows ``[r0 - halo, r1 + halo)`` of a frame and cropped to ``[r0, r1)`` gives the rows
``[r0, r1)`` of the whole-frame result: zero or replicate padding at a band's cut edge only
reaches ``halo`` rows in, and at the frame's own top and bottom the band edge *is* the
frame edge, so the padding is the same as on the whole frame. Results differ from a
whole-frame call only by float noise (convolution kernels sum in another order on other
shapes; ``tests/test_tiling.py`` says how much).

Bands span the full width (one cut direction keeps the bookkeeping small) and the whole
batch; ``band_rows`` picks their height from a workspace budget in bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

MIN_BAND_ROWS = 16  # below this the halo overhead dominates; a band never goes lower


def band_rows(batch: int, width: int, bytes_per_pixel: float, workspace: int | None,
              halo: int = 0) -> int | None:
    """Rows per band so that ``batch * (rows + 2 halo) * width * bytes_per_pixel`` fits
    ``workspace`` bytes; None when no budget is set (whole frames)."""
    if not workspace:
        return None
    rows = int(workspace // max(1.0, batch * width * bytes_per_pixel)) - 2 * halo
    return max(MIN_BAND_ROWS, rows)


def bands(height: int, rows: int | None) -> Iterator[tuple[int, int]]:
    """``(r0, r1)`` row ranges of at most ``rows`` rows covering ``[0, height)``."""
    if rows is None or rows >= height:
        yield 0, height
        return
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


def with_halo(r0: int, r1: int, height: int, halo: int) -> tuple[int, int]:
    """The rows a band needs as input: ``[r0 - halo, r1 + halo)`` clipped to the frame."""
    return max(0, r0 - halo), min(height, r1 + halo)


def map_bands(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int | None,
              halo: int) -> torch.Tensor:
    """``fn(x)`` for a local ``fn`` (output rows = input rows, dependence within ``halo``
    rows), computed band by band; the whole-frame call when ``rows`` covers the frame."""
    h = x.shape[-2]
    if rows is None or rows >= h:
        return fn(x)
    out: torch.Tensor | None = None
    for r0, r1 in bands(h, rows):
        lo, hi = with_halo(r0, r1, h, halo)
        y = fn(x[..., lo:hi, :])
        if out is None:
            out = y.new_empty((*y.shape[:-2], h, y.shape[-1]))
        out[..., r0:r1, :] = y[..., r0 - lo:r1 - lo, :]
    return out


def bilinear_rows(small: torch.Tensor, size: tuple[int, int], r0: int,
                  r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``F.interpolate(small, size, mode='bilinear',
    align_corners=False)``, without making the whole upsampled tensor.

    The same index arithmetic as torch's kernel (source row ``(i + 0.5) * h_in / h_out -
    0.5``, clamped at 0; the lower neighbour and the next one, clamped at the last row):
    columns are interpolated by ``F.interpolate`` on the few source rows needed (with the
    row count unchanged, whose row weights are exactly 1 and 0), then the two rows mixed.
    """
    h_in = small.shape[-2]
    h_out, w_out = size
    dst = torch.arange(r0, r1, device=small.device, dtype=torch.float32)
    src = ((dst + 0.5) * (h_in / h_out) - 0.5).clamp_min(0)
    y0 = src.long().clamp_max(h_in - 1)
    y1 = (y0 + 1).clamp_max(h_in - 1)
    lam = (src - y0.to(src.dtype)).view(1, 1, -1, 1)
    first, last = int(y0[0]), int(y1[-1]) + 1
    cols = F.interpolate(small[..., first:last, :], size=(last - first, w_out),
                         mode="bilinear", align_corners=False)
    top = cols.index_select(-2, y0 - first)
    bottom = cols.index_select(-2, y1 - first)
    return top * (1 - lam).to(cols.dtype) + bottom * lam.to(cols.dtype)
