"""VGPM: VLM-guided phase modulation (recursive FFT-phase refinement, pure torch).

On an image x ``(B, 3, H, W)`` (VICM's output)::

    X      = rfft2(x)                              # per channel, norm="ortho", float32
    phi^   = (angle(X) + pi) / (2 pi)              # normalised phase in [0, 1]
    M_0    = phi^
    M_t    = M_{t-1} + F_t * M_{t-1} * (1 - M_{t-1}),   t = 1..T (T = 8)
    F_t    = s(b) * sigmoid(Psi_p(features))_t * band     in [0, 1], per frequency
    phi'   = 2 pi M_T - pi                         # the refined phase
    y      = irfft2(|X| e^{i phi'}, s=(H, W))      # amplitude kept, output real

Psi_p, the phase estimator, is a small convolution net on the (H, W/2+1) frequency plane:
3x3 conv (7 -> 16), ReLU, 3x3 conv (16 -> 16), ReLU, 1x1 conv (16 -> T). Its inputs, all
per frequency: the normalised phase (3), the per-image standardised log amplitude (3) and
the radial frequency ``2 |f|`` (1). One map F_t per step is shared by the three colour
channels: blur displaces the edges of R, G and B alike, and modulating the channels'
phases independently would move their edges apart (colour fringes); sharing also makes
the recursion three times cheaper. The inputs are detached (an observation of the
spectrum): the gradient of the phase angle goes as ``1/|X|`` and would blow up at the
near-empty frequencies of dark crops; the loss still reaches the input image through the
modulation itself (below) and every Psi_p / Theta_b parameter through F.

Theta_b maps the blur score b to the strength s in [0, 1] (``phase_strength`` in the
rows): Linear(1, 16), ReLU, Linear(16, 1), clamped to [0, 1] with a straight-through
gradient (forward clamped, backward identity, so a strength pushed below 0 can come back).

Identity at initialisation: Theta_b's last layer starts at zero, so s = 0, F = 0,
M_T = phi^ exactly and the output equals the input up to the FFT round trip (~1e-7); the
gradient with respect to Theta_b's last layer is not zero there, so training moves it.

The DC term and a low band are kept out (``band``): taken literally, the recursion moves the
DC phase of a positive image (0 -> normalised 0.5 -> 0.75...), which flips the sign of the
image mean. The band is radial, in cycles per pixel: 0 for |f| <= ``low_band``, a raised
cosine up to 1 at 2 * ``low_band``, 1 above. Default ``low_band`` = 1/32. Why: a motion blur
of length L has a sinc transfer function whose first sign change (the only way blur alters
the phase) is at |f| = 1/L; below 1/32 cycles/px no blur shorter than 32 px (our
augmentation draws 1-15 px) has touched the phase, so there is nothing to undo there, while
changing it moves the mean and the large-scale layout (halos, ghost copies of the whole
scene). The taper avoids the ringing a hard spectral edge would cause.

Numerics: the FFT and the recursion run in float32 (autocast is disabled around them; cuFFT
has no bf16), Psi_p may run under autocast. The output is computed as
``irfft2(X * exp(i (phi' - phi)))``, the same value as ``|X| e^{i phi'}`` but with a
gradient with respect to X that stays finite where |X| is 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 8
WIDTH = 16
LOW_BAND = 1.0 / 32


def clamp_ste(u: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """``clamp(u, lo, hi)`` forward, identity gradient backward."""
    return u + (u.clamp(lo, hi) - u).detach()


def radial_frequency(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """|f| in cycles/px on the rfft2 grid, ``(h, w // 2 + 1)`` float32."""
    fy = torch.fft.fftfreq(h, device=device).view(-1, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    return torch.sqrt(fy * fy + fx * fx).float()


def band_mask(h: int, w: int, low_band: float, device: torch.device | None = None) -> torch.Tensor:
    """0 up to ``low_band``, raised cosine to 1 at ``2 * low_band``, 1 above; DC always 0."""
    r = radial_frequency(h, w, device)
    if low_band <= 0:
        m = torch.ones_like(r)
    else:
        t = ((r - low_band) / low_band).clamp(0, 1)
        m = 0.5 - 0.5 * torch.cos(math.pi * t)
    m[0, 0] = 0.0
    return m


class ThetaB(nn.Module):
    """MLP blur score b -> phase-modulation strength s in [0, 1] (0 at initialisation)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        u = self.net(b.float().reshape(-1, 1)).squeeze(1)
        return clamp_ste(u, 0.0, 1.0)


class PhaseEstimator(nn.Module):
    """Psi_p: spectrum features ``(B, 7, H, Wf)`` -> logits of F ``(B, T, H, Wf)``."""

    def __init__(self, steps: int = STEPS, width: int = WIDTH) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(7, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
        self.conv3 = nn.Conv2d(width, steps, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(feats)))))


def spectrum_features(phase01: torch.Tensor, amp: torch.Tensor, radius: torch.Tensor):
    """Psi_p's input: normalised phase, standardised log amplitude, 2|f| (all detached)."""
    la = torch.log(amp + 1e-6)
    mu = la.mean(dim=(-2, -1), keepdim=True)
    sd = la.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    r = (2 * radius).expand(phase01.shape[0], 1, *radius.shape)
    return torch.cat([phase01, (la - mu) / sd, r], dim=1).detach()


def safe_atan2(im: torch.Tensor, re: torch.Tensor) -> torch.Tensor:
    """``atan2(im, re)`` with a finite gradient (0) where both are 0."""
    nz = (re * re + im * im) > 1e-20
    return torch.atan2(torch.where(nz, im, torch.zeros_like(im)),
                       torch.where(nz, re, torch.ones_like(re)))


def safe_angle(z: torch.Tensor) -> torch.Tensor:
    """``angle(z)`` with a finite gradient (0) where z == 0."""
    return safe_atan2(z.imag, z.real)


class VGPM(nn.Module):
    """Recursive phase modulation guided by the blur score (see the module docstring)."""

    def __init__(
        self, steps: int = STEPS, width: int = WIDTH, low_band: float = LOW_BAND, hidden: int = 16
    ) -> None:
        super().__init__()
        self.steps = int(steps)
        self.low_band = float(low_band)
        self.psi_p = PhaseEstimator(steps, width)
        self.theta_b = ThetaB(hidden)

    def strength(self, b: torch.Tensor) -> torch.Tensor:
        """s(b) ``(B,)`` in [0, 1]."""
        return self.theta_b(b.to(self.theta_b.net[0].weight.device))

    def forward(self, x: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'image', 'phase', 'strength'}``: the output (float32, not clipped), the refined
        phase phi' in radians ``(B, 3, H, W//2+1)``, and s(b) ``(B,)``."""
        h, w = x.shape[-2:]
        s = self.strength(b)
        with torch.autocast(x.device.type, enabled=False):
            # complex numbers only at the FFT boundaries (inductor fuses real ops only)
            re, im = torch.view_as_real(torch.fft.rfft2(x.float(), norm="ortho")).unbind(-1)
            phase01 = (safe_atan2(im, re) + math.pi) / (2 * math.pi)
            radius = radial_frequency(h, w, x.device)
            feats = spectrum_features(phase01, torch.sqrt(re * re + im * im), radius)
        logits = self.psi_p(feats.to(memory_format=torch.contiguous_format))
        with torch.autocast(x.device.type, enabled=False):
            band = band_mask(h, w, self.low_band, x.device)
            gate = torch.sigmoid(logits.float()) * (s.view(-1, 1, 1, 1) * band)
            m = phase01
            for t in range(self.steps):
                m = m + gate[:, t : t + 1] * (m - m * m)
            delta = 2 * math.pi * (m - phase01)  # phi' - phi: rotate X by it
            c, sn = torch.cos(delta), torch.sin(delta)
            rotated = torch.complex(re * c - im * sn, re * sn + im * c)
            out = torch.fft.irfft2(rotated, s=(h, w), norm="ortho")
            refined = 2 * math.pi * m - math.pi
        return {"image": out, "phase": refined, "strength": s}
