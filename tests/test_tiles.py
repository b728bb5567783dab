"""Overlapping fixed-size tiles (``varlide.models.tiles``), the plan varlide-var runs on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from varlide.models.tiles import TilePlan, map_tiles, tile_starts


def test_tile_starts_cover_the_frame_with_the_overlap():
    assert tile_starts(512, 512, 64) == [0]
    assert tile_starts(300, 512, 64) == [0]
    starts = tile_starts(1280, 512, 64)
    assert starts[0] == 0 and starts[-1] == 1280 - 512
    assert all(b - a <= 512 - 64 for a, b in zip(starts, starts[1:], strict=False))


def test_a_frame_of_exactly_one_tile_is_one_call():
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return torch.sin(3 * t) + t.mean()  # not pointwise-separable: blending would show

    x = torch.rand(3, 3, 64, 64)
    out = map_tiles(fn, x, TilePlan(tile=64, overlap=8, batch=2))
    assert calls == [2, 1]
    assert torch.equal(out, torch.cat([fn(x[:2]), fn(x[2:])]))


@pytest.mark.parametrize("size", [(100, 150), (64, 200), (40, 30)])
def test_pointwise_model_is_reproduced_exactly_by_blending(size):
    x = torch.rand(2, 3, *size)
    out = map_tiles(lambda t: t * 0.5 + 0.1, x, TilePlan(tile=64, overlap=16, batch=3))
    torch.testing.assert_close(out, x * 0.5 + 0.1, atol=1e-6, rtol=0)


def test_local_model_matches_inside_and_tiles_batch_across_images():
    seen = []

    def blur(t):
        seen.append(t.shape[0])
        return F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, stride=1)

    x = torch.rand(2, 3, 96, 130)
    plan = TilePlan(tile=64, overlap=32, batch=5)
    out = map_tiles(blur, x, plan)
    tile_calls = list(seen)
    ref = blur(x)
    # a tile's own edge (its padding) differs from the frame; the ramp gives it little weight
    err = (out - ref).abs()
    assert float(err.mean()) < 2e-3 and float(err.max()) < 0.1
    assert float((map_tiles(lambda t: t, x, plan) - x).abs().max()) < 1e-6  # placement
    n_tiles = len(tile_starts(96, 64, 32)) * len(tile_starts(130, 64, 32)) * 2
    assert sum(tile_calls) == n_tiles and tile_calls[:3] == [5, 5, 5]  # across both images


def test_resize_mode_and_tags():
    x = torch.rand(1, 3, 100, 180)
    out = map_tiles(lambda t: t, x, TilePlan(tile=64, overlap=8, mode="resize"))
    assert out.shape == x.shape and 0 <= float(out.min()) <= float(out.max()) <= 1
    assert TilePlan().tag() == "t512o64" and TilePlan(mode="resize").tag() == "resize512"
    with pytest.raises(ValueError, match="mode"):
        TilePlan(mode="crop")
    with pytest.raises(ValueError, match="overlap"):
        TilePlan(tile=64, overlap=64)
