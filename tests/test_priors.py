"""The analytic prior: v monotone in exposure, b monotone in blur and blind to exposure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_rgb
from PIL import Image
from skimage import data as skdata
from torchvision.transforms.functional import gaussian_blur

from varlide.priors import PRIORS, create_prior
from varlide.priors.analytic import (
    exposure_from_visibility,
    quantiles,
    visibility_from_exposure,
)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def prior():
    return create_prior("analytic")


@pytest.fixture(scope="module")
def astro() -> torch.Tensor:
    return to_tensor(skdata.astronaut())  # 512x512, mean luma 0.45: well exposed


def motion_blur(x: torch.Tensor, length: int) -> torch.Tensor:
    k = torch.full((3, 1, 1, length), 1.0 / length)
    xp = F.pad(x, (length // 2, (length - 1) // 2, 0, 0), mode="replicate")
    return F.conv2d(xp, k, groups=3)


def test_registered(prior):
    assert "analytic" in PRIORS.names()
    assert prior.backend == "analytic" and prior.model == "analytic-v1"
    with pytest.raises(TypeError):
        create_prior("analytic", bogus=1)


@pytest.mark.parametrize("which", ["astro", "synthetic"])
def test_visibility_monotone_in_exposure(prior, astro, which):
    x = astro if which == "astro" else to_tensor(make_rgb(96, 128))
    scales = [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0]
    s = prior.score(torch.cat([x * k for k in scales]))
    v = s.visibility
    assert v.dtype == torch.float32 and v.shape == (len(scales),)
    assert torch.all(v.diff() > 0), v
    assert v[0] < 0.05 and v[-1] > 0.85
    assert ((v >= 0) & (v <= 1)).all()


def test_visibility_levels_and_overexposure(prior, astro):
    grey = torch.full((2, 3, 64, 64), 0.45)
    grey[1] = 0.05
    v = prior.score(grey).visibility
    assert v[0] > 0.85 and v[1] < 0.02
    # over-exposed: still "visible" (documented); the curve reads over-exposure from E
    assert prior.score(astro**0.3).visibility.item() > 0.95


def test_exposure_map_inverts():
    e = torch.linspace(0.02, 0.98, 50)
    assert torch.allclose(exposure_from_visibility(visibility_from_exposure(e)), e, atol=1e-4)


def test_quantiles_match_torch():
    flat = torch.rand(3, 1001, generator=torch.Generator().manual_seed(2))
    want = torch.quantile(flat, torch.tensor([0.9, 0.98]), dim=1)
    assert torch.allclose(quantiles(flat, (0.9, 0.98)), want, atol=1e-6)


def test_blur_monotone_gaussian_and_motion(prior, astro):
    g = [astro] + [gaussian_blur(astro, [int(6 * s) | 1] * 2, [s, s]) for s in (1, 2, 4, 8)]
    bg = prior.score(torch.cat(g)).blur
    assert torch.all(bg.diff() > 0.03), bg
    m = [astro] + [motion_blur(astro, n) for n in (5, 11, 21)]
    bm = prior.score(torch.cat(m)).blur
    assert torch.all(bm.diff() > 0.03), bm
    assert ((bg >= 0) & (bg <= 1)).all() and bg[0] < 0.45 and bg[-1] > 0.8


def test_blur_ignores_exposure_and_contrast(prior, astro):
    blurred = gaussian_blur(astro, [13, 13], [2.0, 2.0])
    for x in (astro, blurred):
        b = prior.score(x).blur
        quantised = torch.round(x * 0.2 * 255) / 255  # a dark frame as it would be stored
        low_contrast = 0.5 + 0.3 * (x - 0.5)
        others = prior.score(torch.cat([x * 0.2, quantised, low_contrast])).blur
        assert torch.all((others - b).abs() < 0.05), (b, others)


def test_blur_robust_to_noise(prior, astro):
    gen = torch.Generator().manual_seed(0)
    blurred = gaussian_blur(astro, [13, 13], [2.0, 2.0])
    noisy = (astro + 0.02 * torch.randn(astro.shape, generator=gen)).clamp(0, 1)
    noisy_blurred = (blurred + 0.02 * torch.randn(astro.shape, generator=gen)).clamp(0, 1)
    b = prior.score(torch.cat([astro, noisy, noisy_blurred])).blur
    assert abs(b[1] - b[0]) < 0.05
    assert b[2] > b[1] + 0.1


def test_flat_image_is_blurred_and_in_range(prior):
    s = prior.score(torch.full((1, 3, 32, 32), 0.3))
    assert s.blur.item() == pytest.approx(1.0)
    assert 0 <= s.visibility.item() <= 1


def test_batch_equals_singles(prior):
    xs = [to_tensor(make_rgb(96, 128, seed=i, scale=0.2 + 0.25 * i)) for i in range(4)]
    batch = prior.score(torch.cat(xs))
    for i, x in enumerate(xs):
        one = prior.score(x)
        assert batch.visibility[i].item() == pytest.approx(one.visibility.item(), abs=1e-6)
        assert batch.blur[i].item() == pytest.approx(one.blur.item(), abs=1e-6)


def test_large_frames_use_a_bounded_working_copy(prior, astro):
    # nearest 2x / 4x upscales area-downscale back to the 512 px original exactly
    big = [F.interpolate(astro, scale_factor=k, mode="nearest") for k in (2, 4)]
    a, b2, b4 = prior.score(astro), prior.score(big[0]), prior.score(big[1])
    for s in (b2, b4):
        assert s.visibility.item() == pytest.approx(a.visibility.item(), abs=1e-4)
    assert b4.blur.item() == pytest.approx(b2.blur.item(), abs=1e-4)  # both measured at 512


def test_dev_lowlight_darker_than_the_lit_one(prior, shared_data):
    folder = shared_data / "dev-lowlight"
    files = sorted(folder.glob("*.png"))
    if not files:
        pytest.skip(f"no images in {folder}")
    v = {f.name: prior.score(to_tensor(Image.open(f).convert("RGB"))).visibility.item()
         for f in files}
    lit = v.pop("4.png")
    assert lit > 0.6
    assert all(x < lit for x in v.values()), (lit, v)
