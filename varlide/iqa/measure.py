"""Calling a quality measure on a batch: the size cap and the CPU row-strip path, in one place.

The run engine and ``varlide eval`` both measure through ``measure``, so a score means the
same thing in a run's Parquet and in an evaluation table:
- pyiqa measures and ``piqe`` (``Metric.capped``) see the batch downscaled to ``max_side``
  (``iqa_max_side``; never upscaled); the analytic ones see full resolution;
- on CPU, a full-reference measure whose value is the mean of a map made with a small valid
  window (pyiqa's ``ssim``) is called on horizontal strips of each image and the strip means
  are combined, weighted by their rows: the same value to ~1e-16, 4-8x faster, because the
  float64 convolution it does unfolds 121 doubles per pixel, which leaves the cache on a
  whole frame (see ``strip_window``).
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from varlide.iqa.base import Metric

log = logging.getLogger(__name__)

__all__ = ["downscale", "measure", "measure_strips", "strip_window"]


def downscale(images: torch.Tensor, max_side: int | None) -> torch.Tensor:
    if not max_side:
        return images
    h, w = images.shape[-2:]
    scale = max_side / max(h, w)
    if scale >= 1:
        return images
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="area")


# pyiqa architectures whose score is the mean of a per-pixel map made with a k x k 'valid'
# filter on pointwise-preprocessed inputs (their k), so row strips give the same score.
_STRIP_ARCHS = {"SSIM": 11}
# Output pixels per strip call: pyiqa's ssim filters in float64, which torch does on CPU by
# unfolding 121 doubles per pixel; ~8k pixels (an 8 MB buffer) stays in cache. Measured on a
# 2-core EPYC (1 thread, per 640x480 image): whole frame ~1800 ms, 4-8k-pixel strips ~400 ms.
_STRIP_PIXELS = 8192
_STRIP_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRIP_LOCK = threading.Lock()


def strip_window(metric: Metric) -> int | None:
    """The filter size when ``metric`` may be called on row strips of a frame, else None.

    True of pyiqa's SSIM as built here (``downsample=False``, no border crop): luma per
    pixel, 11x11 'valid' Gaussian filters, the mean of the SSIM map. Rows [r, r + k + 10) of a
    frame give exactly rows [r, r + k) of its map, so the row-weighted mean of the strips'
    scores is the frame's score. Checked once per metric object on a random pair against a
    whole-frame call (must agree to 1e-12); any other measure is called on whole frames.
    """
    with _STRIP_LOCK:
        if metric in _STRIP_CHECKED:
            return _STRIP_CHECKED[metric]
    arch = getattr(getattr(metric, "net", None), "net", None)
    window = _STRIP_ARCHS.get(type(arch).__name__)
    if (window is None or not metric.info.needs_reference
            or getattr(arch, "downsample", True) or getattr(arch, "crop_border", 1)):
        window = None
    else:
        gen = torch.Generator().manual_seed(0)
        x, ref = torch.rand(2, 1, 3, 4 * window, 3 * window, generator=gen)
        whole = metric(x, ref).double()
        strips = measure_strips(metric, x, ref, window, pixels=(2 * window + 1) * 7)
        if not torch.allclose(whole, strips, rtol=0, atol=1e-12):
            log.warning("%s on row strips differs from whole frames (%s vs %s); whole frames",
                        metric.info.name, strips.tolist(), whole.tolist())
            window = None
    with _STRIP_LOCK:
        _STRIP_CHECKED[metric] = window
    return window


def measure_strips(metric: Metric, images: torch.Tensor, reference: torch.Tensor,
                    window: int, pixels: int = _STRIP_PIXELS) -> torch.Tensor:
    """Scores ``(B,)`` float64 of a full-reference map-mean measure, from row strips."""
    b, _, h, w = images.shape
    out_rows, out_cols = h - window + 1, w - window + 1
    rows = max(1, pixels // out_cols)
    values = torch.empty(b, dtype=torch.float64)
    for i in range(b):
        x, ref = images[i:i + 1], reference[i:i + 1]
        total = 0.0
        for top in range(0, out_rows, rows):
            k = min(rows, out_rows - top)
            score = metric(x[..., top:top + k + window - 1, :],
                           ref[..., top:top + k + window - 1, :])
            total += float(score.reshape(-1)[0]) * k
        values[i] = total / out_rows
    return values


def measure(metric: Metric, images: torch.Tensor, max_side: int | None = None,
            reference: torch.Tensor | None = None,
            workspace: int | None = None) -> list[float | None]:
    """Scores of ``images`` ``(B, 3, H, W)`` in [0, 1] (None where not finite).

    ``workspace``: bytes one call's working tensors may take; the batch is measured in
    sub-batches of as many images as fit (at least one; a measure is per image, so the
    values are those of one whole-batch call)."""
    per_image = images[0].numel() // 3 * getattr(metric, "bytes_per_pixel", 400)
    step = len(images) if not workspace else max(1, int(workspace // max(1, per_image)))
    if step >= len(images):
        return _measure(metric, images, max_side, reference)
    out: list[float | None] = []
    for i in range(0, len(images), step):
        ref = None if reference is None else reference[i:i + step]
        out += _measure(metric, images[i:i + step], max_side, ref)
    return out


def _measure(metric: Metric, images: torch.Tensor, max_side: int | None,
             reference: torch.Tensor | None) -> list[float | None]:
    if getattr(metric, "capped", False):  # pyiqa measures and piqe see the capped size
        images = downscale(images, max_side)
        reference = None if reference is None else downscale(reference, max_side)
    window = None
    if reference is not None and images.device.type == "cpu":
        window = strip_window(metric)
    h, w = images.shape[-2:]
    if window is not None and w >= window and h - window + 1 > _STRIP_PIXELS // (w - window + 1):
        values = measure_strips(metric, images, reference, window)
    elif metric.info.needs_reference:
        values = metric(images, reference)
    else:
        values = metric(images)
    return [None if not np.isfinite(v) else float(v)
            for v in values.detach().double().cpu().numpy()]
