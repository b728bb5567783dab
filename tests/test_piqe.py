"""Our banded ``piqe`` equals pyiqa's MATLAB-exact PIQE (the reference) to 1e-6."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from varlide.iqa import create_metric, metric_info
from varlide.iqa import piqe as ours

reference = pytest.importorskip("pyiqa.archs.piqe_arch").piqe
DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev-lowlight"
TOL = 1e-6


def _theirs(batch: torch.Tensor) -> torch.Tensor:
    return reference(batch)[0].double()


def _ours(batch: torch.Tensor) -> torch.Tensor:
    return create_metric("piqe")(batch)


def _synthetic() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 300).expand(3, 200, 300)
    dark = (torch.rand(3, 240, 320, generator=g) * 0.08).round_(decimals=2)  # quantised
    blocks = torch.kron(torch.rand(3, 12, 20, generator=g), torch.ones(16, 16))  # flat tiles
    return [
        torch.rand(3, 720, 1280, generator=g),
        torch.rand(3, 333, 517, generator=g) * 0.2,  # pads both ways
        torch.rand(3, 1080, 64, generator=g),  # 1080 % 16 = 8
        torch.rand(3, 10, 10, generator=g),  # padded to one block
        ramp.contiguous(), dark, blocks,
        torch.full((3, 64, 64), 0.5),  # flat: no active block
    ]


@pytest.mark.parametrize("index", range(8))
def test_equal_to_pyiqa_on_synthetic_images(index):
    image = _synthetic()[index][None]
    torch.testing.assert_close(_ours(image), _theirs(image), rtol=0, atol=TOL)


def test_black_frame_is_nan_like_pyiqa():
    image = torch.zeros(1, 3, 48, 48)
    assert torch.isnan(_theirs(image)).all() and torch.isnan(_ours(image)).all()


def test_frame_without_a_block_is_nan_where_pyiqa_raises():
    image = torch.rand(1, 3, 4, 40)
    with pytest.raises(RuntimeError):
        _theirs(image)
    assert torch.isnan(_ours(image)).all()


def _photos() -> list[torch.Tensor]:
    from PIL import Image

    if not DEV.is_dir():
        pytest.skip(f"{DEV} absent (../shared/data is not part of the repo)")
    out = []
    for path in sorted(DEV.iterdir())[:10]:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return out


def test_equal_to_pyiqa_on_real_night_photographs():
    photos = _photos()
    assert photos
    for image in photos:
        torch.testing.assert_close(_ours(image[None]), _theirs(image[None]), rtol=0, atol=TOL)


def test_batch_equals_singles_and_pyiqa_batch():
    g = torch.Generator().manual_seed(1)
    batch = torch.rand(3, 3, 96, 130, generator=g) * torch.tensor([0.1, 0.5, 1.0])[:, None,
                                                                                 None, None]
    got = _ours(batch)
    torch.testing.assert_close(got, _theirs(batch), rtol=0, atol=TOL)
    singles = torch.cat([_ours(batch[i:i + 1]) for i in range(3)])
    assert torch.equal(got, singles)


def test_band_size_does_not_change_the_score(monkeypatch):
    image = torch.rand(3, 400, 352, generator=torch.Generator().manual_seed(2))
    whole = ours.piqe_score(image)
    monkeypatch.setattr(ours, "BAND_BYTES", 1)  # one block row per band: 25 bands
    assert torch.equal(ours.piqe_score(image), whole)


@pytest.mark.parametrize("near", [0.0, float("inf")])
def test_flat_segment_test_matches_torch_std_either_way(monkeypatch, near):
    """NEAR = inf: every window decided by torch.std (pyiqa's op); NEAR = 0: by the float64
    sums alone. Both give pyiqa's score: the shortcut changes no decision here."""
    image = (torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(3)) * 0.05)
    monkeypatch.setattr(ours, "NEAR", near)
    torch.testing.assert_close(_ours(image[None]), _theirs(image[None]), rtol=0, atol=TOL)


def test_metadata_and_bad_input():
    info = metric_info("piqe")
    assert info.lower_better is True and info.value_range == (0.0, 100.0)
    assert info.source == "varlide" and not info.needs_reference
    with pytest.raises(ValueError, match="expected a"):
        _ours(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="takes no options"):
        create_metric("piqe", block_size=8)
