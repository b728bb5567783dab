"""The backbone slot's ``denoise`` filter and how varlide-lite carries it (tiny configs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from varlide.models import create_enhancer
from varlide.models.denoise import NoiseAdaptiveDenoiser, gaussian_blur, noise_sigma
from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

TINY = dict(width=4, vgpm_width=4, hidden=4)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float(((a - b) ** 2).mean()))


def _scene(h: int = 96, w: int = 128) -> torch.Tensor:
    """A smooth gradient with a bright square (sharp edges): (1, 3, h, w) in [0.2, 0.8]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = 0.2 + 0.3 * xx + 0.1 * yy
    img[h // 4: 3 * h // 4, w // 4: w // 2] += 0.25
    return torch.stack([img, 0.9 * img, 0.8 * img]).unsqueeze(0).clamp(0, 1)


def test_noise_sigma_recovers_added_noise():
    g = torch.Generator().manual_seed(0)
    clean = _scene(256, 256)
    for sigma in (0.005, 0.02, 0.05):
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        est = noise_sigma(noisy)
        assert est.shape == (1, 3)
        assert torch.allclose(est, torch.full_like(est, sigma), rtol=0.15), (sigma, est)
    assert noise_sigma(torch.rand(2, 3, 2, 5)).abs().sum() == 0  # too small to measure


def test_gaussian_blur_keeps_constants_and_mean():
    x = torch.full((1, 3, 9, 11), 0.37)
    assert torch.allclose(gaussian_blur(x, 1.5), x, atol=1e-6)
    r = torch.rand(1, 3, 40, 40)
    assert abs(float(gaussian_blur(r, 2.0).mean() - r.mean())) < 0.01


def test_denoiser_removes_amplified_noise_and_keeps_edges():
    """A dark noisy frame lifted 5x by a 'curve': the filter removes most of the noise the
    gain amplified, and the square's edge stays as sharp as in the clean frame."""
    g = torch.Generator().manual_seed(1)
    clean = _scene()
    dark = 0.1 * clean + 0.006 * torch.randn(clean.shape, generator=g)
    lifted = (dark * 5).clamp(0, 1)  # the curve: gain 5, the noise goes 0.006 -> 0.03
    target = (0.1 * clean * 5).clamp(0, 1)  # the same curve on the noise-free frame
    out = NoiseAdaptiveDenoiser()(lifted, dark)
    assert _psnr(out, target) > _psnr(lifted, target) + 4
    assert abs(float(out.mean() - lifted.mean())) < 2e-3  # the exposure is the curve's
    h, w = clean.shape[-2:]
    row = h // 2
    step_clean = target[0, 0, row, w // 4 + 2] - target[0, 0, row, w // 4 - 3]
    step_out = out[0, 0, row - 2: row + 3, w // 4 + 2].mean() - out[0, 0, row - 2: row + 3,
                                                                     w // 4 - 3].mean()
    assert step_out > 0.85 * step_clean


def test_denoiser_leaves_a_clean_unlifted_frame_nearly_alone():
    clean = _scene()
    out = NoiseAdaptiveDenoiser()(clean, clean)
    assert _psnr(out, clean) > 40
    assert torch.allclose(NoiseAdaptiveDenoiser(strength=0)(clean, clean * 0.5), clean,
                          atol=1e-5)  # strength 0: no noise assumed, nothing removed


def test_denoiser_is_float32_under_autocast_and_differentiable():
    x = (_scene() * 0.1).requires_grad_(True)
    y = x * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NoiseAdaptiveDenoiser()(y, x)
    assert out.dtype == torch.float32
    out.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="window"):
        NoiseAdaptiveDenoiser(window=0)


def test_varlide_lite_backbone_config_version_and_override(tmp_path):
    torch.manual_seed(0)
    model = VarlideLite(VarlideLiteConfig(vgpm=False, backbone="denoise", **TINY))
    version = model.save_pretrained(tmp_path / "w")
    sha = model.weights_version
    assert version == model.version == f"{sha}+denoise-w1.5-k1+hl" and len(sha) == 12
    assert json.loads((tmp_path / "w" / "config.json").read_text())["model"]["backbone"] == \
        "denoise"
    full = dict(skip_visibility=None, full_blur=0.0)
    loaded = create_enhancer("varlide-lite", weights=str(tmp_path / "w"), **full)
    assert loaded.version == f"{sha}+denoise-w1.5-k1+hl" and loaded.weights_version == sha
    plain = create_enhancer("varlide-lite", weights=str(tmp_path / "w"), backbone="identity",
                            **full)
    assert plain.version == f"{sha}+hl"
    g = torch.Generator().manual_seed(2)
    x = (0.08 * _scene(48, 64) + 0.01 * torch.randn(1, 3, 48, 64, generator=g)).clamp(0, 1)
    v, b = torch.tensor([0.02]), torch.tensor([0.3])
    with_dn, without = loaded.enhance(x, v, b), plain.enhance(x, v, b)
    assert with_dn.route == without.route == ["curve"]
    expected = NoiseAdaptiveDenoiser()(without.images, x).clamp(0, 1)
    assert torch.allclose(with_dn.images, expected, atol=1e-5)
    assert not torch.allclose(with_dn.images, without.images, atol=1e-3)
    with pytest.raises(ValueError, match="backbone must be one of"):
        VarlideLite(VarlideLiteConfig(backbone="var", **TINY))


def test_training_forward_goes_through_the_backbone():
    torch.manual_seed(0)
    model = VarlideLite(VarlideLiteConfig(backbone="denoise", **TINY))
    x = (torch.rand(2, 3, 32, 32) * 0.2).requires_grad_(False)
    out = model(x, torch.tensor([0.1, 0.3]), torch.tensor([0.5, 0.5]))
    expected = NoiseAdaptiveDenoiser()(out["curve_image"], x)
    # VGPM starts as the identity, so the output is the denoised curve image
    assert torch.allclose(out["image"], expected, atol=1e-4)
    out["image"].mean().backward()
    assert all(p.grad is not None for p in model.vicm.parameters())


def test_a_new_backbone_is_one_registration(monkeypatch):
    """A backbone registered under a new name is built by name and runs in the slot."""
    from torch import nn

    from varlide.models import create_enhancer
    from varlide.models.backbones import BACKBONES, IdentityBackbone, backbone_names

    class Halve(IdentityBackbone):
        def tag(self) -> str:
            return "halve"

        def forward(self, image, source, sigma_in=None):
            return image * 0.5

    monkeypatch.setitem(BACKBONES._factories, "halve", lambda **_: Halve())
    assert "halve" in backbone_names() and {"identity", "denoise"} <= set(backbone_names())
    x = torch.rand(2, 3, 24, 32) * 0.2
    v, b = torch.full((2,), 0.2), torch.zeros(2)
    plain = create_enhancer("classic-curve").enhance(x, v, b).images
    halved = create_enhancer("classic-curve", backbone="halve")
    assert isinstance(halved.backbone, nn.Module)
    torch.testing.assert_close(halved.enhance(x, v, b).images, plain * 0.5)


def test_a_backbone_gets_its_own_options_from_the_enhancer_config(monkeypatch):
    from varlide.models.backbones import BACKBONES, IdentityBackbone
    from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

    class Scaled(IdentityBackbone):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

    monkeypatch.setitem(BACKBONES._factories, "scaled",
                        lambda factor=1.0, **_: Scaled(factor))
    model = VarlideLite(VarlideLiteConfig(width=4, hidden=4, vgpm=False, backbone="scaled",
                                          backbone_options={"factor": 0.25}))
    assert isinstance(model.backbone, Scaled) and model.backbone.factor == 0.25
    assert model.config.backbone_kwargs()["factor"] == 0.25  # saved with the weights
