"""classic-curve: the Zero-DCE quadratic curve, one alpha per image set from v."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from varlide.models import ENHANCERS, Enhancer, create_enhancer
from varlide.models.classic import N_ITER, alpha_from_visibility
from varlide.priors import create_prior
from varlide.priors.analytic import luma


def to_tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def model():
    return create_enhancer("classic-curve")


@pytest.fixture(scope="module")
def prior():
    return create_prior("analytic")


@pytest.fixture(scope="module")
def astro() -> torch.Tensor:
    return to_tensor(skdata.astronaut())


def mean_luma(x: torch.Tensor) -> torch.Tensor:
    return luma(x).flatten(1).mean(1)


def test_registered_and_no_weights(model):
    assert "classic-curve" in ENHANCERS.names()
    assert isinstance(model, Enhancer) and not list(model.parameters())
    assert model.version == "classic-curve-1" and model.trained_prior == "analytic"
    with pytest.raises(ValueError, match="weights must be None"):
        create_enhancer("classic-curve", weights="some.safetensors")


def test_dark_image_gets_brighter(model, prior, astro):
    dark = astro * 0.1
    s = prior.score(dark)
    r = model.enhance(dark, s.visibility, s.blur)
    m = mean_luma(r.images).item()
    assert mean_luma(dark).item() < 0.05 and 0.3 < m < 0.55
    assert r.route == ["curve"] and r.phase_strength is None and r.n_iter.tolist() == [N_ITER]


def test_well_exposed_mostly_unchanged(model, prior, astro):
    s = prior.score(astro)
    r = model.enhance(astro, s.visibility, s.blur)
    assert (r.images - astro).abs().mean() < 0.02


def test_over_exposed_gets_darker(model, prior, astro):
    bright = astro**0.2
    s = prior.score(bright)
    assert alpha_from_visibility(s.visibility).item() < 0
    assert mean_luma(model.enhance(bright, s.visibility, s.blur).images) < mean_luma(bright)


def test_range_and_monotone_curve(model):
    ramp = torch.linspace(0, 1, 256).view(1, 1, 1, 256).expand(5, 3, 4, 256).contiguous()
    v = torch.tensor([0.0, 0.01, 0.3, 0.95, 1.0])
    out = model.enhance(ramp, v, torch.zeros(5)).images
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(out.diff(dim=-1) >= 0)  # pixel order preserved
    a = alpha_from_visibility(torch.linspace(0, 1, 101))
    assert torch.all(a.diff() <= 0) and a.abs().max() <= 1  # darker v -> stronger


def test_strength_depends_on_v(model, astro):
    dark = astro * 0.2
    x = dark.expand(3, -1, -1, -1)
    r = model.enhance(x, torch.tensor([0.02, 0.2, 0.5]), torch.zeros(3))
    m = mean_luma(r.images)
    assert m[0] > m[1] > m[2] > mean_luma(dark)


def test_batch_equals_singles(model, astro):
    xs = torch.cat([astro * k for k in (0.05, 0.2, 0.6, 1.0)])
    v = torch.tensor([0.01, 0.1, 0.6, 0.99])
    batch = model.enhance(xs, v, torch.zeros(4))
    for i in range(4):
        one = model.enhance(xs[i : i + 1], v[i : i + 1], torch.zeros(1))
        assert torch.allclose(batch.images[i], one.images[0], atol=1e-6)
        assert batch.n_iter[i] == one.n_iter[0]


def test_dev_lowlight_brightened(model, prior, shared_data):
    files = sorted((shared_data / "dev-lowlight").glob("*.png"))
    if not files:
        pytest.skip("no dev-lowlight images")
    for f in files:
        x = to_tensor(Image.open(f).convert("RGB").reduce(2))  # half size: keeps the test fast
        s = prior.score(x)
        y = model.enhance(x, s.visibility, s.blur).images
        before, after = mean_luma(x).item(), mean_luma(y).item()
        assert after > before and 0.15 < after < 0.6, (f.name, before, after)


def test_denoise_option_cleans_a_noisy_dark_frame_and_says_so(model, prior, astro):
    """``enhancer_options: {backbone: denoise}``: closer to the clean curve output, same
    exposure, a version that names the filter; a frame the curve leaves alone stays as is."""
    dn = create_enhancer("classic-curve", backbone="denoise")
    assert dn.version == "classic-curve-1+denoise-w1.5-k1"
    g = torch.Generator().manual_seed(0)
    clean_dark = astro * 0.1
    noisy = (clean_dark + 0.008 * torch.randn(astro.shape, generator=g)).clamp(0, 1)
    s = prior.score(noisy)
    target = model.enhance(clean_dark, s.visibility, s.blur).images  # same alpha, no noise
    plain = model.enhance(noisy, s.visibility, s.blur).images
    cleaned = dn.enhance(noisy, s.visibility, s.blur).images

    def err(a):
        return float(((a - target) ** 2).mean())

    assert err(cleaned) < 0.5 * err(plain)
    assert abs(float(mean_luma(cleaned) - mean_luma(plain))) < 0.01
    lit = (0.55 + 0.02 * torch.randn((1, 3, 64, 64), generator=g)).clamp(0, 1)
    s = prior.score(lit)  # in the target band: alpha = 0, so the filter is not applied either
    out = dn.enhance(lit, s.visibility, s.blur)
    assert out.n_iter.tolist() == [0] and torch.equal(out.images, lit)
    with pytest.raises(TypeError, match="only the option 'backbone'"):
        create_enhancer("classic-curve", strength=2)
