"""The enhancer interface and registry.

An enhancer takes a batch of images and their prior scores and returns enhanced images plus
what it decided per image (iterations, phase strength, route). Weights are resolved outside
(``varlide.weights``); a model never reads a file itself except through ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from varlide.registry import Registry

ROUTES = ("skip", "curve", "full", "deblur")


@dataclass
class EnhanceResult:
    images: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    route: list[str]  # per image, one of ROUTES
    n_iter: torch.Tensor | None = None  # (B,) int: curve iterations applied (VICM's n_v)
    phase_strength: torch.Tensor | None = None  # (B,) float: VGPM strength, None if no VGPM
    # per image, the deblurring stage's decision (varlide.models.deblur.DECISIONS), and the
    # estimated kernel length in px (NaN where not attempted); None: the enhancer has no stage
    deblur: list[str] | None = None
    deblur_kernel_px: torch.Tensor | None = None


class Enhancer(nn.Module):
    """Base class. ``name`` is the registered name; ``version`` identifies the weights."""

    name: str = ""
    version: str = "0"
    # Prior backend (and model) whose v/b scale the weights were trained on; None = any.
    trained_prior: str | None = None
    trained_prior_model: str | None = None
    # Bytes the working tensors of one full-resolution step may take (the run's memory
    # budget sets it; None: whole frames at once). Enhancers whose stages are local run in
    # row bands of this size (varlide.models.tiling); outputs do not depend on it.
    workspace: int | None = None

    def set_workspace(self, nbytes: int | None) -> None:
        self.workspace = int(nbytes) if nbytes else None

    @torch.no_grad()
    def enhance(
        self, images: torch.Tensor, visibility: torch.Tensor, blur: torch.Tensor
    ) -> EnhanceResult:
        """Enhance a batch. An enhancer registered ``local_prior=True`` also takes
        ``local``: the prior's (B, K, G, G) maps (``prior_local``; qinstruct's 3x4x4)."""
        raise NotImplementedError


ENHANCERS: Registry[Enhancer] = Registry("enhancer")


def autocast_for(device: torch.device, precision: str = "auto"):
    """The one autocast decision: bf16 when asked (``bf16``) or on CUDA (``auto``), else
    float32 (``fp32``, or ``auto`` on CPU)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def create_enhancer(
    name: str, weights: str | None = None, device: str | torch.device = "cpu", **kwargs
) -> Enhancer:
    """Build a registered enhancer, load ``weights`` if given, move to ``device``, eval mode."""
    import varlide.models  # noqa: F401  (registers the built-in enhancers)

    model = ENHANCERS.create(name, weights=weights, **kwargs)
    return model.to(device).eval()
