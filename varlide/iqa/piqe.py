"""``piqe``: PIQE (Venkatanath et al. 2015), pyiqa's MATLAB-exact definition, in bands of rows.

Why our own: pyiqa's ``piqe`` was ~35 % of the default job's time at 1280x720 and needs
~140 bytes per pixel at once (a 4K frame: ~1.2 GB), because it builds three full-size masks
next to the score and filters the whole frame with two 7x7 convolutions. Here only the
score is computed, one band of 16-pixel block rows at a time, with the same arithmetic:

- luma is pyiqa's ``to_y_channel(..., 'yiq')`` (the same matmul), scaled by the frame's
  own maximum and rounded to 0..255 (the one whole-frame pass: the maximum);
- the symmetric pad by ``(W % 16, H % 16)`` (pyiqa pads by the remainder, as MATLAB does);
- the local normalisation's 7x7 Gaussian (``normalize_img_with_gauss``, replicate edges) as
  49 shifted-slice multiply-adds in the order the convolution adds them: bit-equal to
  ``F.conv2d`` on CPU and ~7x faster;
- per block, the same variance, centre-surround and edge-segment statistics, and the
  score as one float32 sum over all blocks in pyiqa's block order.

``tests/test_piqe.py`` holds it equal to ``pyiqa.archs.piqe_arch.piqe`` to 1e-6 on random,
synthetic and real photographs, at sizes that need padding, batched and alone. A frame
whose luma is 0 everywhere scores NaN, as in pyiqa (its normalisation divides by 0).
"""

from __future__ import annotations

import torch

from varlide.iqa.base import METRICS, Metric, MetricInfo

BLOCK = 16
ACTIVITY_THRESHOLD = 0.1
IMPAIRED_THRESHOLD = 0.1
SEGMENT = 6
NEAR = 1e-5  # |std - threshold| below which the float32 std decides (see _flat_segments)
GAUSS_SIZE, GAUSS_SIGMA = 7, 7.0 / 6.0
BAND_BYTES = 8 << 20  # working tensors of one band of block rows
BAND_BYTES_PER_PIXEL = 48  # what one band pixel costs while it is normalised (measured)
# pyiqa's rgb2yiq first row (its matrix is applied with matmul; we take its Y column).
_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))

INFO = MetricInfo(
    name="piqe",
    lower_better=True,
    value_range=(0.0, 100.0),
    source="varlide",
    description="PIQE (Venkatanath et al. 2015), no reference, on YIQ luma; pyiqa 0.1.16's "
                "MATLAB-exact definition computed in bands (equal to pyiqa's to 1e-6)",
)


def gaussian_taps() -> list[list[float]]:
    """MATLAB's ``fspecial('gaussian', 7, 7/6)`` as pyiqa builds it, in float32 values."""
    import numpy as np

    m = (GAUSS_SIZE - 1) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * GAUSS_SIGMA * GAUSS_SIGMA))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    h /= h.sum()
    return torch.from_numpy(h).float().tolist()


def _filter7(padded: torch.Tensor, taps: list[list[float]], rows: int, cols: int
             ) -> torch.Tensor:
    """``F.conv2d(padded, taps)`` ('valid') of a 2-D tensor, as slice multiply-adds in the
    convolution's order (row of the kernel outer, column inner): the same float32 sums."""
    out = padded[0:rows, 0:cols] * taps[0][0]
    for i in range(GAUSS_SIZE):
        for j in range(GAUSS_SIZE):
            if i or j:
                out.add_(padded[i:i + rows, j:j + cols], alpha=taps[i][j])
    return out


def _luma255(image: torch.Tensor) -> torch.Tensor:
    """``round(255 * Y / max(Y))`` of one ``(3, H, W)`` image, Y = pyiqa's YIQ luma."""
    # Only the Y column: the same three-term dot product per pixel as pyiqa's 3x3 matmul
    # (bit-equal, tested), 10x cheaper.
    weights = torch.tensor(_YIQ, dtype=image.dtype, device=image.device).t()[:, :1].contiguous()
    _, h, w = image.shape
    y = image.new_empty(h, w)
    step = max(1, BAND_BYTES // max(1, w * 24))
    for r0 in range(0, h, step):
        band = image[:, r0:r0 + step].permute(1, 2, 0)
        y[r0:r0 + step] = torch.matmul(band, weights)[..., 0]
    return y.div_(y.max()).mul_(255).round_()


def _symmetric_pad(y: torch.Tensor) -> torch.Tensor:
    """Pad right by ``W % 16`` and bottom by ``H % 16`` with half-sample symmetry."""
    h, w = y.shape
    right, bottom = w % BLOCK, h % BLOCK
    if right:
        y = torch.cat((y, y[:, w - right:].flip(1)), dim=1)
    if bottom:
        y = torch.cat((y, y[h - bottom:].flip(0)), dim=0)
    return y


def _block_stats(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block ``(N, 16, 16)``: (distortion score, active) as pyiqa computes them."""
    var = torch.var(blocks, dim=[1, 2], unbiased=True)
    active = var > ACTIVITY_THRESHOLD
    # Noise criterion: centre columns 7, 8 against the surround; pyiqa removes column 7,
    # then index 8 of what is left (column 9), so column 8 is in both, as there.
    center = blocks[..., 7:9]
    surround = torch.cat((blocks[..., :7], blocks[..., 8:9], blocks[..., 10:]), dim=-1)
    ratio = torch.nan_to_num(torch.std(center, dim=[1, 2], unbiased=True)
                             / torch.std(surround, dim=[1, 2], unbiased=True))
    sigma = torch.sqrt(var)
    beta = torch.abs(sigma - ratio) / torch.max(sigma, ratio)
    noisy = sigma > 2 * beta
    # Noticeable-distortion criterion: any 6-pixel segment of an edge with std < 0.1.
    edges = torch.stack((blocks[:, 0, :], blocks[:, :, BLOCK - 1], blocks[:, BLOCK - 1, :],
                         blocks[:, :, 0]), dim=1)
    impaired = _flat_segments(edges).flatten(1).any(dim=1)
    whsa = active.float()
    return whsa * impaired.float() * (1 - var) + whsa * noisy.float() * var, active


def _flat_segments(edges: torch.Tensor) -> torch.Tensor:
    """``std(segment) < 0.1`` for every 6-pixel window of every edge ``(N, 4, 16)``.

    torch's float32 std over tiny windows is slow (~70 % of PIQE's time). The test is made
    on window sums in float64 (exact to ~1e-15 here), and only the windows within
    ``NEAR`` of the threshold, where float32 rounding could decide, are recomputed with
    ``torch.std`` as pyiqa does: the same decisions, a fraction of the time."""
    cum = torch.nn.functional.pad(edges.double(), (1, 0)).cumsum_(-1)
    squares = torch.nn.functional.pad(edges.double().square(), (1, 0)).cumsum_(-1)
    s1 = cum[..., SEGMENT:] - cum[..., :-SEGMENT]
    s2 = squares[..., SEGMENT:] - squares[..., :-SEGMENT]
    std = ((s2 - s1 * s1 / SEGMENT) / (SEGMENT - 1)).clamp_(min=0).sqrt_()
    flat = std < IMPAIRED_THRESHOLD
    near = (std - IMPAIRED_THRESHOLD).abs_() < NEAR
    if near.any():
        windows = edges.unfold(-1, SEGMENT, 1)[near]
        flat[near] = torch.std(windows, dim=-1, unbiased=True) < IMPAIRED_THRESHOLD
    return flat


def piqe_score(image: torch.Tensor) -> torch.Tensor:
    """PIQE of one ``(3, H, W)`` image in [0, 1]: a float32 scalar in [0, 100] (lower is
    better); the working memory is one band of block rows plus two float32 frames."""
    y = _symmetric_pad(_luma255(image.float()))
    height, width = y.shape
    n_rows, n_cols = height // BLOCK, width // BLOCK
    taps = gaussian_taps()
    step = max(1, BAND_BYTES // max(1, BAND_BYTES_PER_PIXEL * BLOCK * width))
    scores, actives = [], []
    half = GAUSS_SIZE // 2
    for b0 in range(0, n_rows, step):
        b1 = min(n_rows, b0 + step)
        r0, r1 = b0 * BLOCK, b1 * BLOCK
        rows = torch.arange(r0 - half, r1 + half, device=y.device).clamp_(0, height - 1)
        band = torch.nn.functional.pad(y.index_select(0, rows)[None],
                                       (half, half), mode="replicate")[0]
        mu = _filter7(band, taps, r1 - r0, width)
        second = _filter7(band.square(), taps, r1 - r0, width)
        sigma = (second - mu.square()).abs_().add_(torch.finfo(y.dtype).eps).sqrt_()
        normalized = (band[half:-half, half:-half] - mu).div_(sigma.add_(1))
        blocks = normalized[:, :n_cols * BLOCK].unfold(0, BLOCK, BLOCK).unfold(1, BLOCK, BLOCK)
        score, active = _block_stats(blocks.reshape(-1, BLOCK, BLOCK))
        scores.append(score)
        actives.append(active)
    if not scores:  # no 16x16 block even after padding: undefined (pyiqa raises)
        return torch.tensor(float("nan"))
    total = torch.cat(scores)[None].sum(dim=1)[0]
    count = torch.cat(actives)[None].sum(dim=1)[0]
    return ((total + 1) / (1 + count)) * 100


class Piqe(Metric):
    """``piqe`` over a batch, image by image (PIQE normalises each frame by its own max)."""

    info = INFO
    # Two float32 frames (luma, padded luma) plus the caller's float copy (12 B/px) and a
    # band of BAND_BYTES, counted per pixel at 1280x720 (benchmarks/memory.py).
    bytes_per_pixel = 24
    capped = True  # iqa_max_side applies, as it did to pyiqa's piqe

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        x = images.to(self.device)
        return torch.stack([piqe_score(img) for img in x]).double()


def _factory(device: str | torch.device = "cpu", **kwargs) -> Piqe:
    if kwargs:
        raise TypeError(f"metric 'piqe' takes no options, got {sorted(kwargs)}")
    return Piqe(device)


_factory.info = INFO
METRICS.register("piqe")(_factory)
