"""Quality measures: analytic statistics, pyiqa metrics, metadata and name resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.measure import shannon_entropy
from torchvision.transforms.functional import gaussian_blur

from varlide.iqa import METRICS, create_metric, metric_info
from varlide.iqa.pyiqa_metrics import parse_score_range
from varlide.priors.analytic import luma
from varlide.registry import UnknownNameError

OURS = ["brightness", "contrast", "entropy", "colorfulness", "sharpness", "overexposed"]


def to_tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def astro() -> torch.Tensor:
    return to_tensor(skdata.astronaut())


def m(name: str, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
    return create_metric(name)(x, ref)


def test_constant_image():
    x = torch.full((2, 3, 32, 32), 0.4)
    for name in ("entropy", "contrast", "colorfulness", "sharpness"):
        out = m(name, x)
        assert out.dtype == torch.float64 and out.shape == (2,)
        assert out.abs().max().item() == pytest.approx(0.0, abs=1e-9), name
    assert m("brightness", x)[0].item() == pytest.approx(0.4, abs=1e-6)


def test_brightness_and_overexposed_known_images():
    x = torch.zeros(2, 3, 10, 10)
    x[0, :, :5] = 0.2
    x[0, :, 5:] = 0.6
    x[1, 0] = 1.0  # pure red
    assert m("brightness", x).tolist() == pytest.approx([0.4, 0.299], abs=1e-6)
    half_white = torch.zeros(1, 3, 10, 10)
    half_white[..., :5, :] = 1.0
    assert m("overexposed", half_white).item() == pytest.approx(0.5)
    assert m("overexposed", x).tolist() == [0.0, 0.0]  # a saturated red is not a blown pixel


def test_entropy_contrast_colorfulness_reference_values(astro):
    half = torch.zeros(1, 3, 8, 8)
    half[..., 4:] = 1.0
    assert m("entropy", half).item() == pytest.approx(1.0)
    assert m("contrast", half).item() == pytest.approx(0.5, abs=1e-6)
    y8 = (luma(astro)[0, 0] * 255).round().numpy().astype(np.uint8)
    assert m("entropy", astro).item() == pytest.approx(shannon_entropy(y8), abs=1e-9)
    rgb = astro[0].double().numpy() * 255
    rg, yb = rgb[0] - rgb[1], 0.5 * (rgb[0] + rgb[1]) - rgb[2]
    want = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    assert m("colorfulness", astro).item() == pytest.approx(want, rel=1e-6)
    assert m("colorfulness", luma(astro).expand(-1, 3, -1, -1)).item() == pytest.approx(0, abs=1e-6)


def test_sharpness_drops_with_blur(astro):
    xs = torch.cat([astro] + [gaussian_blur(astro, [9, 9], [s, s]) for s in (0.8, 1.5, 3.0)])
    s = m("sharpness", xs)
    assert torch.all(s.diff() < 0), s


def test_analytic_batch_equals_singles(astro):
    xs = torch.cat([astro, astro * 0.3, astro.flip(-1) ** 2])
    for name in OURS:
        batch = m(name, xs)
        singles = torch.cat([m(name, xs[i : i + 1]) for i in range(3)])
        assert torch.allclose(batch, singles, rtol=1e-9, atol=1e-9), name


def test_psnr_ssim_order(astro):
    gen = torch.Generator().manual_seed(0)
    x = astro[..., :128, :128]
    noisy = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    noisier = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    batch, ref = torch.cat([x, noisy, noisier]), x.expand(3, -1, -1, -1)
    for name in ("psnr", "ssim"):
        s = m(name, batch, ref)
        assert s.dtype == torch.float64 and torch.isfinite(s).all()
        assert s[0] > s[1] > s[2], (name, s)
    assert m("psnr", x, x).item() == pytest.approx(80.0)  # pyiqa's eps cap, documented
    with pytest.raises(ValueError, match="reference"):
        m("psnr", x)


def test_ssim_on_row_strips_equals_the_whole_frame(astro):
    """The CPU strip path (engine and eval) gives pyiqa's whole-frame SSIM, to 1e-12."""
    from varlide.iqa.measure import measure, strip_window

    gen = torch.Generator().manual_seed(1)
    x = astro[..., :300, :256]
    batch = torch.cat([x, (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)])
    ref = x.expand(2, -1, -1, -1)
    ssim = create_metric("ssim", device="cpu")
    assert strip_window(ssim) == 11  # the strip path is taken for these frames
    whole = ssim(batch, ref).double()
    strips = torch.tensor(measure(ssim, batch, None, ref), dtype=torch.float64)
    assert torch.allclose(strips, whole, rtol=0, atol=1e-12), (strips, whole)
    assert strips[0] > strips[1]  # the noisy copy scores lower


def test_piqe_on_a_real_image(shared_data):
    path = shared_data / "dev-lowlight" / "3.png"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    x = to_tensor(Image.open(path).convert("RGB"))
    piqe = create_metric("piqe")
    s = piqe(x)
    lo, hi = metric_info("piqe").value_range
    assert torch.isfinite(s).all() and lo <= s.item() <= hi
    crops = torch.cat([x[..., :160, :200], x[..., -160:, -200:]])  # batch == singles
    assert torch.allclose(piqe(crops), torch.cat([piqe(crops[:1]), piqe(crops[1:])]))
    from varlide.iqa.pyiqa_metrics import PyiqaMetric

    assert PyiqaMetric("piqe").net.lower_better is True  # pyiqa agrees with metric_info


def test_metric_info_directions():
    want = {"brightness": None, "contrast": False, "entropy": False, "colorfulness": False,
            "sharpness": False, "overexposed": True, "piqe": True, "psnr": False, "ssim": False}
    for name, lower in want.items():
        info = metric_info(name)
        assert info.lower_better is lower, name
        assert info.needs_reference == (name in ("psnr", "ssim")), name
    assert metric_info("entropy").source == "varlide"  # ours wins over pyiqa's entropy
    assert metric_info("psnr").value_range == (0.0, 80.0)
    assert metric_info("piqe").value_range == (0.0, 100.0)
    assert set(OURS + ["piqe", "psnr", "ssim"]) <= set(METRICS.names())


def test_generic_pyiqa_names():
    info = metric_info("niqe")  # weights needed to build, not to describe
    assert info.source == "pyiqa" and info.lower_better is True and not info.needs_reference
    assert metric_info("lpips").needs_reference
    gmsd = create_metric("gmsd")  # classical: works offline
    assert gmsd.info.lower_better is True
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert gmsd(x, x).shape == (2,)


def test_parse_score_range():
    assert parse_score_range("0, 100") == (0.0, 100.0)
    assert parse_score_range("~0, ~40") == (0.0, 40.0)
    assert parse_score_range("0, ~") == (0.0, math.inf)
    assert parse_score_range("~, 2") == (-math.inf, 2.0)
    assert parse_score_range("quality: 0, 1; rank: 0, 2") is None
    assert parse_score_range(None) is None


def test_unknown_name_lists_known():
    with pytest.raises(UnknownNameError) as err:
        create_metric("piqee")
    msg = str(err.value)
    assert all(n in msg for n in OURS + ["piqe", "pyiqa"])
    with pytest.raises(KeyError):
        metric_info("no-such-metric")
