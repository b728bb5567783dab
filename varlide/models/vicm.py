"""VICM: the visibility-informed conditioning module (adaptive curve iterations, pure torch).

A Zero-DCE curve estimator gives N = 8 map triples A_1..A_N; an MLP Theta_v maps the
visibility score v to an iteration count n_v in [1, N]; maps beyond n_v are zero
(A_j = 0 for j > n_v), i.e. the curve stops after n_v iterations.

Theta_v: input ``[v, logit(v) / 8]`` -> 16 -> 16 -> 1 (ReLU), then
``tau = 1 + (N - 1) * sigmoid(u)``, a continuous iteration count in [1, N]. The logit
feature is there because a prior's v saturates near 1 for well-lit *and* over-exposed
frames (analytic: v(E=0.5) = 0.94, v(E=0.9) = 0.994), yet they need different curves; its
logit (for the analytic backend ``4 * ln(E / 0.25)``) keeps them apart, and near 0 it
separates "dark" from "very dark". The last layer starts at weight 0 and
``tau = INIT_TAU`` (most of the N iterations, close to Zero-DCE's fixed N at the start).

Trainable truncation (how): iteration n gets the weight

    training  (``mask="soft"``): w_n = sigmoid((tau + 0.5 - n) / temperature)
    inference (``mask="hard"``): w_n = 1 if n <= n_v else 0,   n_v = clamp(floor(tau + 0.5), 1, N)

so the hard mask is the soft one's limit as ``temperature -> 0`` (both switch at
``n = tau + 0.5``, i.e. n_v = round(tau)), and d w_n / d tau carries the loss gradient to
Theta_v. The trainer anneals ``temperature`` (1 -> 0.05 by default) so the train-time
output converges onto the inference-time one. ``mask="ste"`` (straight-through: forward
hard, backward soft) is offered for an ablation. ``nn.Module.eval()`` does not change the
mask by itself; callers pass ``mask`` (the enhancer always passes "hard").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from varlide.models.curve_net import N_MAPS, WIDTH, CurveNet, apply_curves

INIT_TAU = 6.5  # initial continuous iteration count (7 of 8 iterations at the start)
LOGIT_SCALE = 8.0
MASKS = ("soft", "hard", "ste")


def visibility_features(v: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 2)``: ``[v, logit(v) / 8]`` with v clamped to [1e-4, 1 - 1e-4]."""
    v = v.float().reshape(-1, 1).clamp(1e-4, 1 - 1e-4)
    return torch.cat([v, torch.logit(v) / LOGIT_SCALE], dim=1)


class ThetaV(nn.Module):
    """MLP v -> continuous iteration count tau in [1, N]."""

    def __init__(self, n_max: int = N_MAPS, hidden: int = 16, init_tau: float = INIT_TAU):
        super().__init__()
        self.n_max = int(n_max)
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        if self.n_max > 1:
            frac = min(max((init_tau - 1) / (self.n_max - 1), 1e-3), 1 - 1e-3)
            nn.init.constant_(last.bias, math.log(frac / (1 - frac)))
        else:
            nn.init.zeros_(last.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        u = self.net(visibility_features(v)).squeeze(1)
        return 1 + (self.n_max - 1) * torch.sigmoid(u)


def hard_iterations(tau: torch.Tensor, n_max: int) -> torch.Tensor:
    """n_v = clamp(floor(tau + 0.5), 1, N) as int64 ``(B,)``."""
    return torch.floor(tau.detach() + 0.5).clamp(1, n_max).long()


def iteration_mask(
    tau: torch.Tensor, n_max: int, mode: str = "hard", temperature: float = 0.1
) -> torch.Tensor:
    """Per-image iteration weights ``(B, N)`` in [0, 1] (see the module docstring)."""
    if mode not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mode!r}")
    n = torch.arange(1, n_max + 1, device=tau.device, dtype=torch.float32)
    if mode == "hard":
        return (n.unsqueeze(0) <= hard_iterations(tau, n_max).unsqueeze(1)).float()
    soft = torch.sigmoid((tau.float().unsqueeze(1) + 0.5 - n) / max(float(temperature), 1e-4))
    if mode == "soft":
        return soft
    hard = (n.unsqueeze(0) <= hard_iterations(tau, n_max).unsqueeze(1)).float()
    return hard + (soft - soft.detach())  # exactly hard forward, soft gradient


class VICM(nn.Module):
    """Curve estimator + Theta_v truncation. ``adaptive=False`` is fixed N (no Theta_v)."""

    def __init__(
        self,
        n_iter: int = N_MAPS,
        width: int = WIDTH,
        downscale: float = 1.0,
        adaptive: bool = True,
        hidden: int = 16,
        init_tau: float = INIT_TAU,
    ) -> None:
        super().__init__()
        self.n_iter = int(n_iter)
        self.adaptive = bool(adaptive)
        self.curve = CurveNet(n_maps=n_iter, width=width, downscale=downscale)
        self.theta_v = ThetaV(n_iter, hidden, init_tau) if adaptive else None

    def tau(self, v: torch.Tensor) -> torch.Tensor:
        if self.theta_v is None:
            return torch.full((v.numel(),), float(self.n_iter), device=v.device)
        return self.theta_v(v.to(next(self.parameters()).device))

    def truncation(self, v: torch.Tensor, mask: str = "hard", temperature: float = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(tau, weights, n_iter)`` for scores ``v``: the iteration mask (None: fixed N)
        and the hard n_v, from v alone (the maps are not needed)."""
        tau = self.tau(v)
        if self.theta_v is None:
            n_iter = torch.full((v.numel(),), self.n_iter, dtype=torch.long, device=tau.device)
            return tau, None, n_iter
        weights = iteration_mask(tau, self.n_iter, mask, temperature)
        return tau, weights, hard_iterations(tau, self.n_iter)

    def forward(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        mask: str = "hard",
        temperature: float = 0.1,
        downscale: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{'image', 'maps', 'tau', 'weights', 'n_iter'}`` for images ``x`` and scores ``v``.

        ``image`` is float32 in [0, 1]; ``n_iter`` the hard n_v (int64, what inference uses).
        """
        maps = self.curve(x, downscale=downscale)
        tau, weights, n_iter = self.truncation(v, mask, temperature)
        image = apply_curves(x, maps, weights)
        return {"image": image, "maps": maps, "tau": tau, "weights": weights, "n_iter": n_iter}
