"""``zero-dce``: the fixed-iteration baseline (Zero-DCE, Guo et al. CVPR 2020).

The same curve estimator as VICM (:class:`~varlide.models.curve_net.CurveNet`, seven 3x3
convolutions of 32 channels, 3N = 24 maps) applied for a fixed N = 8 iterations, no
Theta_v, no VGPM, no routing (every image takes the route ``curve``, ``n_iter`` = 8,
``phase_strength`` None). Trained by the same trainer on the same data with Zero-DCE's own
losses (``varlide.losses.ZeroDCELoss``), so it is the baseline of the ablation table. It
ignores the prior scores at inference, but its weights still record the prior the trainer
used (the trainer computes them for every model).

Weights: the same ``save_pretrained`` / ``from_pretrained`` format as ``varlide-lite``
(``model.safetensors`` + ``config.json``); default weights at ``varlide/models/shipped/zero-dce/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, autocast_for
from varlide.models.curve_net import CurveNet, apply_curves
from varlide.models.pretrained import (
    WEIGHTS_FILE,
    Pretrained,
    default_weights_dir,
    missing_default_weights,
)


@dataclass
class ZeroDCEConfig:
    n_iter: int = 8
    width: int = 32
    downscale: float = 1.0  # 1 = Zero-DCE; > 1 = the Zero-DCE++ estimation trick


class ZeroDCE(Pretrained, Enhancer):
    name = "zero-dce"
    config_class = ZeroDCEConfig

    def __init__(
        self,
        config: ZeroDCEConfig | None = None,
        *,
        precision: str = "auto",
        channels_last: bool | None = None,
        downscale: float | None = None,
    ) -> None:
        super().__init__()
        self.config = config or ZeroDCEConfig()
        self.curve = CurveNet(self.config.n_iter, self.config.width, self.config.downscale)
        self.version = "untrained"
        self.trained_prior = "analytic"
        self.trained_prior_model = None
        self.pretrained_info: dict[str, Any] = {}
        self.precision = precision
        self.channels_last = channels_last
        self.downscale = downscale

    def forward(self, x: torch.Tensor, v=None, b=None, **_: Any) -> dict[str, torch.Tensor | None]:
        """Training forward, same keys as VarlideLite's (``phase``/``strength`` None)."""
        maps = self.curve(x, downscale=self.downscale)
        img = apply_curves(x, maps)
        n = torch.full((x.shape[0],), self.config.n_iter, dtype=torch.long, device=x.device)
        return {"image": img, "curve_image": img, "maps": maps, "tau": None, "weights": None,
                "n_iter": n, "phase": None, "strength": None}

    @torch.no_grad()
    def enhance(
        self, images: torch.Tensor, visibility: torch.Tensor | None = None,
        blur: torch.Tensor | None = None,
    ) -> EnhanceResult:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        dev = images.device
        cl = self.channels_last if self.channels_last is not None else dev.type == "cuda"
        x = images.float()
        xs = x.contiguous(memory_format=torch.channels_last) if cl else x
        with autocast_for(dev, self.precision):
            maps = self.curve(xs, downscale=self.downscale)
        out = apply_curves(x, maps).clamp(0, 1).contiguous()
        n = images.shape[0]
        return EnhanceResult(
            images=out, route=["curve"] * n,
            n_iter=torch.full((n,), self.config.n_iter, dtype=torch.int16, device=dev),
            phase_strength=None,
        )


@ENHANCERS.register("zero-dce", trainable=True, model=ZeroDCE, default_loss="zero-dce",
                    ships_weights=True)
def _make_zero_dce(weights: str | None = None, **kw) -> ZeroDCE:
    """``weights=None``: the shipped default weights (varlide/models/shipped/zero-dce/)."""
    if weights is None:
        folder = default_weights_dir("zero-dce")
        if not (folder / WEIGHTS_FILE).is_file():
            raise missing_default_weights("zero-dce")
        weights = str(folder)
    return ZeroDCE.from_pretrained(weights, **kw)
