"""Row bands give whole-frame results (up to float noise), and the pieces they rest on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from varlide.models.curve_net import (
    CurveNet,
    _apply_curves_autograd,
    apply_curves,
    curve_in_bands,
    used_iterations,
)
from varlide.models.denoise import NoiseAdaptiveDenoiser, gaussian_blur, noise_sigma
from varlide.models.tiling import band_rows, bands, bilinear_rows, map_bands
from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

# Float noise of a band against the whole frame: convolutions and the separable upsampling
# sum in another order on other shapes. Measured max |diff| ~2e-6 on [0, 1] outputs.
BAND_ATOL = 2e-5


def _frames(b=2, h=203, w=157, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=gen)
    return F.avg_pool2d(x, 5, 1, 2) * 0.4 + 0.02 * torch.rand(b, 3, h, w, generator=gen)


def _conv_ref(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The depthwise-convolution Gaussian the slice implementation replaced."""
    import math

    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"),
                    k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def test_bands_cover_the_frame_once():
    assert list(bands(10, None)) == [(0, 10)]
    assert list(bands(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert band_rows(1, 100, 10, None) is None
    assert band_rows(2, 100, 10, 10**9) > 1000
    assert band_rows(2, 1000, 1000, 1) == 16  # never thinner than MIN_BAND_ROWS


def test_bilinear_rows_equal_interpolate():
    small = torch.rand(2, 6, 17, 23)
    whole = F.interpolate(small, size=(67, 90), mode="bilinear", align_corners=False)
    for r0, r1 in ((0, 67), (0, 5), (13, 40), (60, 67)):
        part = bilinear_rows(small, (67, 90), r0, r1)
        assert torch.allclose(part, whole[:, :, r0:r1], atol=1e-6, rtol=0)


def test_slice_blur_and_separable_noise_estimate_match_convolutions():
    x = _frames()
    for sigma in (1.5, 2.0):
        assert torch.allclose(gaussian_blur(x, sigma), _conv_ref(x, sigma), atol=1e-6)
    mask = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3)
    r = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), mask)
    ref = (torch.pi / 2) ** 0.5 / 6 * r.abs().mean(dim=(1, 2, 3)).view(2, 3)
    assert torch.allclose(noise_sigma(x), ref, rtol=1e-5)
    assert torch.allclose(noise_sigma(x, rows=7), ref, rtol=1e-5)  # banded: the same sums


def test_denoiser_in_bands_equals_whole_frame():
    x = _frames()
    y = (x * 3).clamp(0, 1)
    d = NoiseAdaptiveDenoiser()
    sigma = d.prepare(x, rows=16)
    whole = d(y, x)
    banded = map_bands(lambda yx: d(yx[:, :3], yx[:, 3:], sigma), torch.cat([y, x], 1), 20,
                       d.halo)
    assert (banded - whole).abs().max() < BAND_ATOL


def test_curves_in_bands_equal_whole_frame_at_full_and_reduced_resolution():
    torch.manual_seed(0)
    net = CurveNet(width=8).eval()
    x = _frames()
    w = torch.tensor([[1.0] * 5 + [0.0] * 3, [1.0] * 3 + [0.0] * 5])
    for k in (1.0, 4.0):
        with torch.inference_mode():
            ref = _apply_curves_autograd(x, net(x, downscale=k), w)
            for ws in (None, 200_000, 2_000_000):
                out = curve_in_bands(net, x, w, downscale=k, workspace=ws)
                assert (out - ref).abs().max() < BAND_ATOL, (k, ws)


def test_fast_curve_equals_reference_loop_and_skips_zero_iterations():
    x, maps = _frames(), torch.rand(2, 24, 203, 157) * 2 - 1
    w = torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] * 2 + [0.0] * 6])
    with torch.inference_mode():
        fast = apply_curves(x, maps, w)
        assert torch.equal(fast, _apply_curves_autograd(x, maps, w))  # same ops, same order
        assert used_iterations(w, 8) == 4
        assert torch.equal(apply_curves(x, maps[:, :12], w[:, :4]), fast)
    assert used_iterations(None, 8) == 8


def test_varlide_lite_workspace_does_not_change_outputs():
    torch.manual_seed(1)
    cfg = VarlideLiteConfig(width=8, vgpm=False, backbone="denoise", inference_downscale=4)
    model = VarlideLite(cfg, skip_visibility=None).eval()
    x = _frames(b=3)
    v, b = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.1, 0.1, 0.1])
    whole = model.enhance(x, v, b)
    model.set_workspace(300_000)  # a few rows per band, image by image
    banded = model.enhance(x, v, b)
    assert (banded.images - whole.images).abs().max() < BAND_ATOL
    assert torch.equal(banded.n_iter, whole.n_iter)
    assert model.version.endswith("+ds4+denoise-w1.5-k1+hl")


def test_analytic_measures_in_row_bands_equal_whole_frame_formulas(monkeypatch):
    from varlide.iqa import analytic
    from varlide.priors.analytic import luma

    x = _frames(b=2, h=301, w=157)
    x[0, :, :20] = 1.0  # some over-exposed rows
    y = luma(x).double().flatten(1)
    rg = (x[:, 0] - x[:, 1]).double().flatten(1) * 255
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).double().flatten(1) * 255
    lap = F.conv2d(luma(x) * 255, analytic._LAPLACE.view(1, 1, 3, 3)).double().flatten(1)
    idx = (luma(x).flatten(1) * 255).round().clamp(0, 255).long()
    p = torch.stack([torch.bincount(i, minlength=256) for i in idx]).double() / idx.shape[1]
    expected = {
        "brightness": y.mean(1), "contrast": y.std(1, unbiased=False),
        "entropy": -(p * torch.log2(p.where(p > 0, torch.ones_like(p)))).sum(1),
        "colorfulness": torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
        + 0.3 * torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2),
        "sharpness": lap.var(1, unbiased=False), "overexposed": (y >= 0.98).double().mean(1),
    }
    monkeypatch.setattr(analytic, "BAND_BYTES", 2 * 157 * 48 * 9)  # 9-row bands: 34 of them
    for name, want in expected.items():
        got = getattr(analytic, name)(x)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), name
