"""The blind deblurring stage's parts: kernel measures, the kernel step, edge tapering, the
oracle deconvolution ceiling, and the gate leaving a sharp frame alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from varlide.demo import motion_blur_kernel, photos_uint8
from varlide.models.deblur import (
    DECISIONS,
    BlindDeblur,
    DeblurSettings,
    deconvolve,
    estimate_kernel_step,
    kernel_length,
    kernel_similarity,
    psf2otf,
    taper_pad,
)


def _photo(side: int = 128) -> torch.Tensor:
    img = photos_uint8()[0][1][:side, :side].astype(np.float32) / 255
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


def _blur(x: torch.Tensor, k: np.ndarray) -> torch.Tensor:  # circular, the FFT's model
    otf = psf2otf(torch.from_numpy(k)[None], x.shape[-2:])[:, None]
    return torch.fft.irfft2(torch.fft.rfft2(x) * otf, s=x.shape[-2:])


def _psnr(a, b) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def _pad(k: np.ndarray, size: int) -> torch.Tensor:
    out = torch.zeros(1, size, size)
    o = (size - k.shape[0]) // 2
    out[0, o:o + k.shape[0], o:o + k.shape[0]] = torch.from_numpy(k)
    return out


@pytest.mark.parametrize("length", [5, 9, 15])
def test_kernel_length_of_a_line_kernel(length):
    k = torch.from_numpy(motion_blur_kernel(length, 30.0))[None]
    assert abs(float(kernel_length(k)[0]) - length) < 1.0
    delta = torch.zeros(1, 5, 5)
    delta[0, 2, 2] = 1
    assert float(kernel_length(delta)[0]) == pytest.approx(1.0)


def test_kernel_similarity_tells_kernels_apart():
    a = _pad(motion_blur_kernel(9, 0.0), 15)
    shifted = torch.roll(a, 2, dims=2)
    turned = _pad(motion_blur_kernel(9, 90.0), 15)
    assert float(kernel_similarity(a, a)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(kernel_similarity(a, shifted)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(kernel_similarity(a, turned)[0]) < 0.3


def test_kernel_step_recovers_the_kernel_from_the_sharp_latent():
    lum = _photo().mean(dim=1)
    k = motion_blur_kernel(9, 30.0)
    y = _blur(lum[:, None], k)[:, 0]
    est = estimate_kernel_step(lum, y, 15, gamma=2.0)
    assert float(kernel_similarity(est, _pad(k, 15))[0]) > 0.95
    assert float(est.sum()) == pytest.approx(1.0, abs=1e-5) and float(est.min()) >= 0


def test_taper_pad_is_smooth_across_the_wrap():
    x = _photo(64)
    p = taper_pad(x, 16)
    assert p.shape[-2:] == (96, 96)
    torch.testing.assert_close(p[..., 16:80, 16:80], x)
    seam = (p[..., 0, :] - p[..., -1, :]).abs().max()  # rows that meet at the wrap
    assert float(seam) < 0.02


def test_oracle_deconvolution_restores_a_blurred_photograph():
    """The ceiling a perfect kernel estimate reaches: dB over the blurred input, with the
    demo's degradation (a reflect-padded convolution, not the FFT's circular model)."""
    from varlide.demo import degrade

    x = _photo()
    clean = x[0].permute(1, 2, 0).numpy()
    low, _ = degrade(clean, np.random.default_rng(0), gamma=1.0, exposure=1.0,
                     kernel_length=9, kernel_angle=30.0, noise_sigma=0.003, shot_noise=0.0)
    y = torch.from_numpy(low).permute(2, 0, 1)[None]
    k = torch.from_numpy(motion_blur_kernel(9, 30.0))[None]
    for steps, mu in ((0, 1e-2), (4, 5e-4)):
        out = deconvolve(y, k, torch.tensor([mu]), steps).clamp(0, 1)
        assert _psnr(out, x) > _psnr(y, x) + 0.5, steps


def test_gate_leaves_a_sharp_frame_unchanged():
    x = _photo()
    r = BlindDeblur(DeblurSettings(kernel_size=9, crop=64, estimate_side=128))(x)
    assert r.decision[0] in DECISIONS and r.decision[0] != "applied"
    assert torch.equal(r.images, x)
    assert r.kernels.shape == (1, 9, 9) and r.kernel_px.shape == (1,)


def test_settings_are_validated_and_tagged():
    with pytest.raises(ValueError, match="odd"):
        DeblurSettings(kernel_size=8)
    assert DeblurSettings().tag() == "deblur"
    assert DeblurSettings(tv_steps=0).tag() == "deblur-tv_steps0"


# --------------------------------------------------------------------------- in varlide-lite


def _lite(**inference):
    from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

    torch.manual_seed(0)
    return VarlideLite(VarlideLiteConfig(vgpm=False, width=4, hidden=4), **inference).eval()


def test_varlide_lite_deblur_routes_decisions_and_version():
    """Opt-in: a well-exposed blurred frame takes the ``deblur`` route (deblurring only), a
    dark blurred one is deblurred after the curve, sharp ones are ``off``; each attempted
    image gets a decision and a kernel length, and the output is the stage's own."""
    from varlide.models.tone import protect_highlights

    sharp = _photo(96)
    blurred = _blur(sharp, motion_blur_kernel(9, 20.0)).clamp(0, 1)
    x = torch.cat([blurred, sharp, blurred * 0.2, sharp * 0.2])
    v = torch.tensor([0.9, 0.9, 0.1, 0.1])
    b = torch.tensor([0.8, 0.1, 0.8, 0.1])
    off = _lite()
    assert off.routes(v, b) == ["skip", "skip", "curve", "curve"]
    r0 = off.enhance(x, v, b)
    assert r0.deblur is None and r0.deblur_kernel_px is None and "deblur" not in off.version
    model = _lite(deblur=True)
    assert model.version.endswith("+deblur+hl")
    r = model.enhance(x, v, b)
    assert r.route == ["deblur", "skip", "curve", "curve"]
    assert r.deblur[1] == "off" and r.deblur[3] == "off"
    assert r.deblur[0] in DECISIONS[1:] and r.deblur[2] in DECISIONS[1:]
    px = r.deblur_kernel_px
    assert torch.isnan(px[[1, 3]]).all() and torch.isfinite(px[[0, 2]]).all()
    assert float(px[0]) > 3  # a 9 px blur is seen as blur
    assert torch.equal(r.images[1], x[1])  # skip: untouched
    assert torch.equal(r.images[3], r0.images[3])  # sharp, dark: the curve alone
    direct = BlindDeblur()(x[:1])
    assert direct.decision[0] == r.deblur[0]
    want = protect_highlights(direct.images.clone(), x[:1])
    assert torch.allclose(r.images[0], want[0], atol=1e-6)
    if r.deblur[0] != "applied":  # the gate kept the input: nothing changed at all
        assert torch.equal(r.images[0], x[0])


def test_deblur_option_is_validated():
    from varlide.models.varlide_lite import deblur_stage

    assert deblur_stage(False) is None and deblur_stage(None) is None
    assert deblur_stage({"mu": 1e-3}).settings.mu == 1e-3
    with pytest.raises(ValueError, match="unknown setting"):
        deblur_stage({"strength": 2})
    with pytest.raises(ValueError, match="method must be 'blind' or 'learned'"):
        deblur_stage("yes")
    with pytest.raises(ValueError, match="expected true, false"):
        deblur_stage(3)
