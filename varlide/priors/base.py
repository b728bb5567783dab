"""The prior interface: a scorer that gives every image a visibility v and a blur b in [0, 1].

v: higher = better lit / more visible. b: higher = blurrier. Scores feed learned modules,
so a backend's scale is part of an enhancer's contract (DESIGN.md, "Priors feed learned
modules"); ``backend`` and ``model`` are recorded in every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varlide.registry import Registry


@dataclass
class PriorScores:
    visibility: torch.Tensor  # (B,) float32 in [0, 1]
    blur: torch.Tensor  # (B,) float32 in [0, 1]


class Prior:
    """Base class. Subclasses set ``backend``/``model`` and implement ``score``."""

    backend: str = ""
    model: str | None = None

    def score(self, images: torch.Tensor) -> PriorScores:
        """Score a batch ``(B, 3, H, W)`` float in [0, 1] on the prior's device."""
        raise NotImplementedError


PRIORS: Registry[Prior] = Registry("prior")


def create_prior(name: str, device: str | torch.device = "cpu", **kwargs) -> Prior:
    """Build a registered prior backend (``analytic``, later ``clip``)."""
    import varlide.priors  # noqa: F401  (registers the built-in backends)

    return PRIORS.create(name, device=device, **kwargs)
