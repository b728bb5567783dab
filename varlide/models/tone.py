"""Highlight protection: an enhanced frame never clips more than its input did.

The curve lifts every pixel, so a street lamp or headlight at luma 0.8 in the input lands
at white and burns out (measured: the over-exposed fraction of blurred night street scenes
rose from 0.1 % to 0.7 %). ``protect_highlights`` rolls the output's luma off above
``knee`` towards ``ceiling`` with an exponential shoulder (slope 1 at the knee, so mid-tones
are untouched and no band appears), never below the input's own luma (a lamp is not made
dimmer than it was; a pixel the enhancer did not brighten is left as it is), and never to
white where the input was not white (``OVEREXPOSED_LUMA``,
the threshold the ``overexposed`` measure counts). RGB is scaled by the luma ratio, so hue
and saturation are kept: a yellow lamp stays yellow instead of turning grey-white.
"""

from __future__ import annotations

import torch

from varlide.iqa.analytic import OVEREXPOSED_LUMA
from varlide.priors.analytic import luma

KNEE = 0.8
CEILING = 0.97
BAND_ROWS = 256  # rows per band: a few float32 planes of one band, never the whole frame


def shoulder(lum: torch.Tensor, knee: float = KNEE, ceiling: float = CEILING) -> torch.Tensor:
    """Identity below ``knee``; above it ``knee + w (1 - exp(-(l - knee) / w))`` with
    ``w = ceiling - knee``: continuous in value and slope, and below ``ceiling`` for all l."""
    _check(knee, ceiling)
    w = ceiling - knee
    over = (lum - knee).clamp_min(0)
    return torch.where(lum > knee, knee + w * (1 - torch.exp(-over / w)), lum)


def _check(knee: float, ceiling: float) -> None:
    if not 0 < knee < ceiling < OVEREXPOSED_LUMA:
        raise ValueError(f"need 0 < knee < ceiling < {OVEREXPOSED_LUMA}, got knee={knee}, "
                         f"ceiling={ceiling}")


def _target_luma(lo: torch.Tensor, lx: torch.Tensor, knee: float,
                 ceiling: float) -> torch.Tensor:
    """max(shoulder(L_out), min(L_out, L_in)), held at max(ceiling, L_in) unless the input
    was already over-exposed there (then its white is the input's, not ours). A pixel the
    enhancer did not brighten (L_out <= L_in) keeps L_out exactly."""
    target = torch.maximum(shoulder(lo, knee, ceiling), torch.minimum(lo, lx))
    cap = torch.where(lx >= OVEREXPOSED_LUMA, torch.full_like(lx, float("inf")),
                      lx.clamp_min(ceiling))
    return torch.minimum(target, cap)


def protect_highlights(out: torch.Tensor, source: torch.Tensor, knee: float = KNEE,
                       ceiling: float = CEILING) -> torch.Tensor:
    """Roll off ``out``'s highlights in place (``(B, 3, H, W)`` in [0, 1], float), given the
    ``source`` frames it was enhanced from; returns ``out``. Works in bands of
    ``BAND_ROWS`` rows, so a 4K batch costs a few band-sized planes, not frame-sized ones."""
    _check(knee, ceiling)
    if out.shape != source.shape:
        raise ValueError(f"output {tuple(out.shape)} and source {tuple(source.shape)} differ")
    for r0 in range(0, out.shape[-2], BAND_ROWS):
        o = out[..., r0:r0 + BAND_ROWS, :]
        lo = luma(o)
        if not bool((lo > knee).any()):
            continue
        lx = luma(source[..., r0:r0 + BAND_ROWS, :].float())
        ratio = _target_luma(lo, lx, knee, ceiling) / lo.clamp_min(1e-6)
        o.mul_(ratio).clamp_(0, 1)
    return out
