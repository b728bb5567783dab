"""Highlight protection: outputs never clip more than their inputs, mid-tones are untouched,
hue is kept, and the banded path equals a one-shot computation."""

import pytest
import torch

from varlide.iqa.analytic import OVEREXPOSED_LUMA, overexposed
from varlide.models import tone
from varlide.models.tone import protect_highlights, shoulder
from varlide.priors.analytic import luma


def test_shoulder_identity_below_knee_continuous_and_below_ceiling():
    lum = torch.linspace(0, 5, 5001)
    s = shoulder(lum, knee=0.8, ceiling=0.97)
    below = lum <= 0.8
    assert torch.equal(s[below], lum[below])
    assert (s <= 0.97).all() and (s.diff() >= 0).all()  # monotone, at most the ceiling
    # slope 1 at the knee: no visible band where the roll-off starts
    eps = 1e-3
    slope = (shoulder(torch.tensor(0.8 + eps)) - shoulder(torch.tensor(0.8))) / eps
    assert abs(float(slope) - 1) < 1e-2


@pytest.mark.parametrize("knee,ceiling", [(0.0, 0.9), (0.9, 0.8), (0.8, 0.99)])
def test_bad_knee_or_ceiling_is_refused(knee, ceiling):
    with pytest.raises(ValueError, match="knee"):
        shoulder(torch.rand(4), knee=knee, ceiling=ceiling)


def test_never_clips_more_than_the_input():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 3, 40, 50, generator=g) * 0.6
    source[0, :, :5, :5] = 1.0  # a light source already white in the input
    out = (source * 2.5).clamp(0, 1)  # a curve that burns out everything above 0.4
    before = overexposed(out)
    protect_highlights(out, source)
    assert (overexposed(out) <= overexposed(source) + 1e-12).all()
    assert (before > overexposed(source)).all()  # the test image did clip before
    # the input's own white stays white; nothing else reaches OVEREXPOSED_LUMA
    lo = luma(out)[:, 0]
    assert (lo[0, :5, :5] >= OVEREXPOSED_LUMA).all()
    lx = luma(source)[:, 0]
    assert (lo[lx < OVEREXPOSED_LUMA] < OVEREXPOSED_LUMA).all()
    # a highlight is never made darker than it was in the input
    assert (lo >= lx - 1e-5).all()


def test_pixels_not_brightened_are_left_alone():
    """What a deblurred but not brightened frame relies on: where the output is no brighter
    than the input (bright pixels included), the roll-off changes nothing."""
    g = torch.Generator().manual_seed(3)
    source = 0.9 + 0.1 * torch.rand(2, 3, 20, 20, generator=g)  # luma 0.9..1: all above the knee
    out = source * 0.999
    kept = out.clone()
    protect_highlights(out, source)
    assert torch.equal(out, kept)


def test_midtones_untouched_and_hue_kept():
    g = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, 16, 16, generator=g) * 0.3
    out = source * 2.0  # luma <= 0.6 < knee
    kept = out.clone()
    protect_highlights(out, source)
    assert torch.equal(out, kept)
    # a bright orange lamp: rolled off, with its channel ratios kept
    lamp = torch.tensor([1.0, 0.8, 0.3]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    src = lamp * 0.5
    protect_highlights(lamp, src)
    rgb = lamp[0, :, 0, 0]
    assert float(luma(lamp)[0, 0, 0, 0]) < tone.CEILING
    assert torch.allclose(rgb / rgb[0], torch.tensor([1.0, 0.8, 0.3]), atol=1e-5)


def test_banded_equals_one_shot_and_shape_mismatch(monkeypatch):
    g = torch.Generator().manual_seed(2)
    source = torch.rand(2, 3, 70, 9, generator=g)
    out = (source * 1.8).clamp(0, 1)
    whole = protect_highlights(out.clone(), source)
    monkeypatch.setattr(tone, "BAND_ROWS", 16)
    banded = protect_highlights(out.clone(), source)
    assert torch.allclose(whole, banded, atol=1e-7)
    with pytest.raises(ValueError, match="differ"):
        protect_highlights(out, source[:, :, :10])
