"""Each zero-reference loss has the sign and minimum it should; gradients reach every weight."""

from __future__ import annotations

import math

import pytest
import torch

from varlide.losses import (
    VarlideLoss,
    ZeroDCELoss,
    color_constancy,
    create_loss,
    exposure_loss,
    exposure_offset,
    image_phase,
    spatial_consistency,
    structural_contrast,
    structural_entropy,
    total_variation,
)
from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig
from varlide.models.zero_dce import ZeroDCE, ZeroDCEConfig


def flat(value: float, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.full((1, 3, h, w), value)


def smooth(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ph = torch.rand(3, generator=g) * 6
    return torch.stack([0.5 + 0.4 * torch.sin(xx / 3 + yy / 5 + p) for p in ph])[None]


def test_exposure_minimum_at_target_and_quadratic():
    assert exposure_loss(flat(0.45)) == pytest.approx(0, abs=1e-10)
    assert exposure_loss(flat(0.65)) == pytest.approx(0.04, rel=1e-5)
    assert exposure_loss(flat(0.25)) == pytest.approx(0.04, rel=1e-5)
    assert exposure_loss(flat(0.55)) < exposure_loss(flat(0.65))


def test_exposure_offset_sources_and_bounds():
    # uniform input: no relative brightness anywhere -> E_d = 0
    assert exposure_offset(flat(0.1)).abs().max() < 1e-6
    # a bright half and a dark half: the bright patches aim higher, bounded by 0.1
    x = torch.zeros(1, 3, 32, 64)
    x[..., 32:] = 0.4
    x[..., :32] = 0.02
    ed = exposure_offset(x)
    assert ed.shape == (1, 1, 2, 4)
    assert (ed[..., 2:] > 0.05).all() and (ed[..., :2] < -0.05).all()
    assert ed.abs().max() <= 0.1
    # visibility-driven: dark frame -0.1, bright frame +0.1
    v = torch.tensor([0.0, 0.5, 1.0])
    assert exposure_offset(flat(0.2).expand(3, -1, -1, -1), v, mode="visibility").flatten(
    ).tolist() == pytest.approx([-0.1, 0.0, 0.1])
    assert exposure_offset(x, mode="none").abs().max() == 0
    with pytest.raises(ValueError):
        exposure_offset(x, mode="visibility")


def test_structural_entropy_sign_and_extremes():
    h = w = 32
    impulse = torch.zeros(1, 3, h, w)
    impulse[..., 5, 7] = 1.0  # its phase alone rebuilds one point: entropy ~ 0 (the minimum)
    e_min = structural_entropy(image_phase(impulse), (h, w))
    g = torch.Generator().manual_seed(0)
    noise_phase = image_phase(torch.rand(1, 3, h, w, generator=g))
    e_noise = structural_entropy(noise_phase, (h, w))
    e_struct = structural_entropy(image_phase(smooth(h, w)), (h, w))
    assert e_min < 0.01
    assert 0 <= e_min < e_struct < e_noise <= 1
    assert e_noise > 0.8


def test_structural_contrast_sign_and_minimum():
    assert structural_contrast(flat(0.3)) == pytest.approx(0, abs=1e-12)
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float()
    best = structural_contrast(checker.expand(1, 3, 32, 32))
    assert best == pytest.approx(-0.25, abs=1e-6)  # the minimum: every patch half 0, half 1
    img = smooth()
    low = 0.5 + 0.3 * (img - 0.5)
    assert structural_contrast(img) < structural_contrast(low) < 0


def test_total_variation():
    assert total_variation(flat(0.7)) == 0
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(2, 1, 4, 8) / 8
    # Zero-DCE's formula: 2 * (sum dh^2 / ((H-1) W) + sum dw^2 / (H (W-1))) / B
    expected = 2 * (0 + (2 * 4 * 7 * (1 / 8) ** 2) / (4 * 7)) / 2
    assert total_variation(ramp) == pytest.approx(expected)
    assert total_variation(smooth()) < total_variation(smooth() + 0.1 * torch.rand(1, 3, 32, 32))


def test_spatial_consistency():
    x = smooth()
    assert spatial_consistency(x, x) == pytest.approx(0, abs=1e-12)
    assert spatial_consistency(x + 0.2, x) == pytest.approx(0, abs=1e-10)  # a shift keeps it
    assert spatial_consistency(flat(0.5), x) > 0  # flattening the structure does not


def test_color_constancy():
    assert color_constancy(flat(0.4)) == pytest.approx(0, abs=1e-5)
    cast = flat(0.4).clone()
    cast[:, 0] = 0.7
    assert color_constancy(cast) > color_constancy(flat(0.4)) + 0.05


def test_compositions_weights_as_data():
    with pytest.raises(ValueError, match="unknown loss term"):
        VarlideLoss({"nope": 1.0})
    assert ZeroDCELoss().weights == {"tv": 200.0, "spa": 1.0, "col": 5.0, "exp": 10.0}
    loss = create_loss("varlide", weights={"en": 0.0, "con": 2.0}, ed_mode="none")
    x = smooth() * 0.2
    out = {"image": x * 2, "maps": torch.zeros(1, 24, 32, 32), "phase": None}
    total, terms = loss(out, x)
    assert "en" not in terms
    assert total.item() == pytest.approx(sum(loss.weights[k] * v for k, v in terms.items()),
                                         rel=1e-5)
    with pytest.raises(ValueError):
        create_loss("other")


def _assert_all_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("mask", ["soft", "ste"])
def test_gradients_reach_every_parameter_of_varlide_lite(mask):
    torch.manual_seed(0)
    model = VarlideLite(VarlideLiteConfig(width=4, vgpm_width=4, hidden=4))
    with torch.no_grad():  # leave the zero init (identity VGPM, constant Theta_v) behind
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        model.vgpm.theta_b.net[-1].bias.fill_(0.5)
    x = smooth(32, 32) * 0.2
    x = torch.cat([x, x * 2])
    v, b = torch.tensor([0.05, 0.5]), torch.tensor([0.3, 0.8])
    out = model(x, v, b, mask=mask, temperature=0.5)
    loss, terms = VarlideLoss()(out, x, v, b)
    loss.backward()
    assert set(terms) == {"exp", "en", "con", "tv", "spa", "col"}
    _assert_all_grads(model)


def test_gradients_reach_every_parameter_of_zero_dce():
    torch.manual_seed(0)
    model = ZeroDCE(ZeroDCEConfig(width=4))
    x = smooth() * 0.2
    loss, _ = ZeroDCELoss()(model(x), x)
    loss.backward()
    _assert_all_grads(model)
    assert math.isfinite(loss.item())
