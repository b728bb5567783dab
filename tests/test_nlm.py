"""Non-local means in the backbone slot: the formula, noise removed with edges kept, a clean
frame left alone, bands equal to the whole frame, and the slot's registry and version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_denoise import _psnr, _scene

from varlide.models.backbones import backbone_names, build_backbone
from varlide.models.denoise import NoiseAdaptiveDenoiser
from varlide.models.nlm import MIN_VAR, NonLocalMeansDenoiser, nl_means
from varlide.models.tiling import map_bands


def _naive(y: np.ndarray, var: np.ndarray, patch: int, search: int, h: float) -> np.ndarray:
    """The module docstring's formula, pixel by pixel, edges replicated."""
    c, hh, ww = y.shape

    def at(img, i, j):
        return img[..., min(max(i, 0), hh - 1), min(max(j, 0), ww - 1)]

    out = np.zeros_like(y)
    for i in range(hh):
        for j in range(ww):
            ws, vals = [], []
            for dy in range(-search, search + 1):
                for dx in range(-search, search + 1):
                    if dy == 0 and dx == 0:
                        continue
                    d = np.mean([(at(y, i + a, j + b) - at(y, i + a + dy, j + b + dx)) ** 2
                                 for a in range(-patch, patch + 1)
                                 for b in range(-patch, patch + 1)])
                    s = max((at(var, i, j) + at(var, i + dy, j + dx)) / 2, MIN_VAR)
                    ws.append(math.exp(-max(d - 2 * s, 0) / (h * h * s)))
                    vals.append(at(y, i + dy, j + dx))
            w0 = max(max(ws), 1e-6)
            out[:, i, j] = (sum(w * v for w, v in zip(ws, vals, strict=True))
                            + w0 * y[:, i, j]) / (sum(ws) + w0)
    return out


def test_nl_means_is_the_formula():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 3, 7, 9, generator=g, dtype=torch.float64)
    var = 0.01 + 0.02 * torch.rand(1, 1, 7, 9, generator=g, dtype=torch.float64)
    got = nl_means(y, var, patch=1, search=2, h=0.8)[0].numpy()
    want = _naive(y[0].numpy(), var[0, 0].numpy(), 1, 2, 0.8)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_nlm_removes_amplified_noise_and_keeps_edges_better_than_lee():
    g = torch.Generator().manual_seed(1)
    clean = _scene()
    dark = 0.1 * clean + 0.006 * torch.randn(clean.shape, generator=g)
    lifted = (dark * 5).clamp(0, 1)
    target = (0.1 * clean * 5).clamp(0, 1)
    out = NonLocalMeansDenoiser()(lifted, dark)
    lee = NoiseAdaptiveDenoiser()(lifted, dark)
    assert _psnr(out, target) > _psnr(lifted, target) + 4
    assert abs(float(out.mean() - lifted.mean())) < 2e-3
    h, w = clean.shape[-2:]
    col = w // 4

    def step(img):  # the square's left edge, one pixel either side
        return float(img[0, 0, h // 2 - 4: h // 2 + 5, col + 1].mean()
                     - img[0, 0, h // 2 - 4: h // 2 + 5, col - 2].mean())

    assert step(out) > 0.9 * step(target) and step(out) >= step(lee) - 1e-3


def test_nlm_leaves_a_clean_frame_alone():
    clean = _scene()
    assert _psnr(NonLocalMeansDenoiser()(clean, clean), clean) > 45


def test_nlm_in_bands_equals_the_whole_frame():
    g = torch.Generator().manual_seed(2)
    src = (0.1 * _scene(70, 40) + 0.006 * torch.randn(1, 3, 70, 40, generator=g)).clamp(0, 1)
    y = (src * 4).clamp(0, 1)
    m = NonLocalMeansDenoiser()
    sigma = m.prepare(src)
    whole = m(y, src, sigma)
    stacked = torch.cat([y, src], dim=1)
    banded = map_bands(lambda t: m(t[:, :3], t[:, 3:], sigma), stacked, 16, m.halo)
    assert torch.allclose(whole, banded, atol=1e-6)


def test_nlm_is_a_registered_backbone_with_a_tag():
    assert "nlm" in backbone_names()
    m = build_backbone("nlm", window=1.5, strength=1.0, search=2)
    assert isinstance(m, NonLocalMeansDenoiser) and m.tag() == "nlm-p1-s2-h0.8"
    with pytest.raises(ValueError, match="nlm"):
        NonLocalMeansDenoiser(search=0)
