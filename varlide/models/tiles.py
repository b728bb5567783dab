"""Fixed-size overlapping tiles, blended back: for models that only take one input size.

Why: VARSR restores 512x512 images (its token scales end at 32x32 with a 16x tokenizer), and
a driving frame is 720p-4K. So ``varlide-var`` cuts a frame into 512x512 tiles that overlap
by ``overlap`` px, runs the model on batches of tiles gathered across the tiles *and the
images* of a batch, and blends the tiles back with weights that ramp linearly across the
overlap (a tile's seam pixels count little, its centre fully). A frame smaller than a tile
is reflect-padded up to one tile and cropped back. A frame that is exactly one tile is one
call of the model: the tiled result equals the untiled one bit for bit.

The alternative, ``resize`` mode, scales the frame to one tile and back (cheap, soft). The
plan is part of the enhancer's version string (``TilePlan.tag``), because it changes the
output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("tile", "resize")


@dataclass(frozen=True)
class TilePlan:
    """How a frame becomes model-sized inputs: ``tile`` px squares overlapping by
    ``overlap`` px (mode ``tile``), or the whole frame resized to one tile (``resize``);
    ``batch``: tiles per model call."""

    tile: int = 512
    overlap: int = 64
    mode: str = "tile"
    batch: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tiles: mode must be one of {MODES}, got {self.mode!r}")
        if self.tile < 2 or not 0 <= self.overlap < self.tile or self.batch < 1:
            raise ValueError(f"tiles: need tile >= 2, 0 <= overlap < tile, batch >= 1; got "
                             f"{self.tile}, {self.overlap}, {self.batch}")

    def tag(self) -> str:
        """For the version string: ``t512o64`` or ``resize512``."""
        if self.mode == "resize":
            return f"resize{self.tile}"
        return f"t{self.tile}o{self.overlap}"


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles covering ``[0, length)`` (``length >= tile``): a stride of
    ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(tile: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Per-pixel weight along one axis: rising over the first ``overlap`` px, falling over
    the last, 1 between; never 0 (a frame edge is covered by one tile only)."""
    i = torch.arange(tile, device=device, dtype=torch.float32)
    if overlap == 0:
        return torch.ones(tile, device=device)
    up = (i + 1) / (overlap + 1)
    down = (tile - i) / (overlap + 1)
    return torch.minimum(torch.minimum(up, down), torch.ones_like(up))


def _padded(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Reflect-pad bottom and right up to ``tile`` where the frame is smaller (replicate
    where reflection cannot reach)."""
    ph, pw = max(0, tile - x.shape[-2]), max(0, tile - x.shape[-1])
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def map_tiles(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              plan: TilePlan) -> torch.Tensor:
    """``fn`` (model-sized batches ``(n, C, tile, tile)`` -> same shape) over ``images``
    ``(B, C, H, W)`` by ``plan``; returns ``(B, C, H, W)``."""
    if plan.mode == "resize":
        return _resized(fn, images, plan)
    b, c, h, w = images.shape
    x = _padded(images, plan.tile)
    hp, wp = x.shape[-2:]
    t = plan.tile
    coords = [(i, y, xx) for i in range(b) for y in tile_starts(hp, t, plan.overlap)
              for xx in tile_starts(wp, t, plan.overlap)]
    if len(coords) == b and hp == t and wp == t:  # every frame is exactly one tile
        return torch.cat([fn(x[i:i + plan.batch]) for i in range(0, b, plan.batch)])[
            ..., :h, :w]
    ramp = _ramp(t, plan.overlap, x.device)
    weight = ramp[:, None] * ramp[None, :]
    acc = torch.zeros((b, c, hp, wp), dtype=torch.float32, device=x.device)
    total = torch.zeros((b, 1, hp, wp), dtype=torch.float32, device=x.device)
    for k in range(0, len(coords), plan.batch):
        chunk = coords[k:k + plan.batch]
        out = fn(torch.stack([x[i, :, y:y + t, xx:xx + t] for i, y, xx in chunk]))
        for (i, y, xx), o in zip(chunk, out.float(), strict=True):
            acc[i, :, y:y + t, xx:xx + t] += o * weight
            total[i, :, y:y + t, xx:xx + t] += weight
    return (acc / total)[..., :h, :w].to(images.dtype)


def _resized(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
             plan: TilePlan) -> torch.Tensor:
    """``resize`` mode: the frame to one tile (area down, bicubic up), the model, back."""
    size = images.shape[-2:]
    t = plan.tile
    small = F.interpolate(images.float(), size=(t, t), mode="area" if min(size) >= t
                          else "bicubic", align_corners=None if min(size) >= t else False)
    outs = torch.cat([fn(small[i:i + plan.batch]) for i in range(0, small.shape[0],
                                                                  plan.batch)])
    back = F.interpolate(outs.float(), size=tuple(size), mode="bicubic", align_corners=False)
    return back.clamp(0, 1).to(images.dtype)
