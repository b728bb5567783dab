"""``restorer``: a compact learned motion-deblurring network, and the stage that gates it.

Why (docs/METHOD.md, "A learned restorer"): the weight-free blind route's kernel estimate is
not good enough to gain on well-lit blurred frames, so the issue's second route is a small
network trained on pairs made from the user's own frames by the paper's degradation model
(``varlide train DATA OUT --enhancer restorer``: random line and random-trajectory motion
kernels, Poisson-Gaussian noise, the 8-bit grid; ``varlide.training``).

The network is a residual U-Net (``RestorerConfig.widths``: one level per width, two 3x3
convolutions per level each way, stride-2 down and transposed up, skip connections by
addition, the last convolution zero-initialised so an untrained model is the identity).
Inference runs in row bands (``workspace`` bytes) with ``halo`` rows of context either side,
band edges on the network's stride grid: every output row sees what it would see in the
whole frame, so bands change nothing but float noise (``tests/test_restorer.py``).

``LearnedDeblur`` is the stage ``varlide-lite`` calls (``enhancer_options: {deblur:
learned}``): the network, then the same do-no-harm gate as the blind route
(``varlide.models.deblur.gate``: sharpness must rise, flat regions must not ring, nothing
more clipped); its rows record the decision and a null kernel length (no kernel is
estimated). ``restorer`` is also an enhancer of its own (deblurring only: route ``deblur``
where b >= ``full_blur``, else ``skip``), which is what ``varlide train`` trains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, autocast_for
from varlide.models.deblur import DeblurResult, gate
from varlide.models.denoise import noise_sigma
from varlide.models.pretrained import (
    WEIGHTS_FILE,
    Pretrained,
    default_weights_dir,
    missing_default_weights,
)

NAME = "restorer"
FULL_BLUR = 0.30  # varlide-lite's threshold: the same analytic-b scale


@dataclass
class RestorerConfig:
    """Architecture (saved in config.json; changing it needs new weights)."""

    widths: tuple[int, ...] = (24, 48, 96, 128)  # channels per level, finest first

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"restorer: widths needs >= 2 positive levels, got {self.widths}")

    @property
    def stride(self) -> int:
        """The input side must be a multiple of this (2 per down step)."""
        return 2 ** (len(self.widths) - 1)

    @property
    def halo(self) -> int:
        """Rows of context a band needs: the receptive field's radius (per level four 3x3
        convolutions and the 2x2 down and up steps, two 3x3 in the middle, each reaching
        2^level px; the first and last convolutions 1 px), rounded up to the stride grid."""
        levels = len(self.widths) - 1
        radius = 2 + sum(6 * 2 ** lv for lv in range(levels)) + 2 * 2 ** levels
        return self.stride * math.ceil(radius / self.stride)


def _block(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.GELU())


class RestorerNet(nn.Module):
    """The residual U-Net: ``x + net(x)`` for ``x`` whose sides are multiples of ``stride``."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        w = widths
        self.inp = nn.Conv2d(3, w[0], 3, padding=1)
        self.enc = nn.ModuleList([_block(w[i]) for i in range(len(w) - 1)])
        self.down = nn.ModuleList([nn.Conv2d(w[i], w[i + 1], 2, stride=2)
                                   for i in range(len(w) - 1)])
        self.mid = _block(w[-1])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                 for i in range(len(w) - 1)])
        self.dec = nn.ModuleList([_block(w[i]) for i in range(len(w) - 1)])
        self.out = nn.Conv2d(w[0], 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for enc, down in zip(self.enc, self.down, strict=True):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = self.mid(h)
        for up, dec, skip in zip(reversed(self.up), reversed(self.dec), reversed(skips),
                                 strict=True):
            h = dec(up(h) + skip)
        return x + self.out(h)


def _pad_to(x: torch.Tensor, m: int) -> torch.Tensor:
    """Reflect-pad bottom and right to multiples of ``m`` (replicate when too small)."""
    ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
    if not ph and not pw:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def band_plan(height: int, rows: int, stride: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(in_start, in_end, out_start, out_end) row ranges covering ``height`` (a multiple of
    ``stride``): output bands of about ``rows`` rows, inputs widened by ``halo`` each side,
    every start on the stride grid."""
    rows = max(stride, rows - rows % stride)
    plan = []
    for o0 in range(0, height, rows):
        o1 = min(height, o0 + rows)
        plan.append((max(0, o0 - halo), min(height, o1 + halo), o0, o1))
    return plan


class Restorer(Pretrained, Enhancer):
    """The network with the weights format of every trainable model (``save_pretrained``)."""

    name = NAME
    config_class = RestorerConfig

    def __init__(self, config: RestorerConfig | None = None, *,
                 full_blur: float = FULL_BLUR, **gate_options: Any) -> None:
        super().__init__()
        self.config = config or RestorerConfig()
        self.net = RestorerNet(self.config.widths)
        self.weights_version = "untrained"
        self.trained_prior = "analytic"
        self.trained_prior_model = None
        self.pretrained_info: dict[str, Any] = {}
        self.full_blur = float(full_blur)
        self.gate_settings = LearnedDeblurSettings(**gate_options)

    @property
    def version(self) -> str:
        return self.weights_version

    @version.setter
    def version(self, value: str) -> None:
        self.weights_version = value

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None,
                b: torch.Tensor | None = None, **_: Any) -> dict[str, torch.Tensor]:
        """Training: ``{"image": restored}`` (not clipped); v, b and the curve trainer's
        keywords are accepted and unused."""
        h, w = x.shape[-2:]
        return {"image": self.net(_pad_to(x, self.config.stride))[..., :h, :w]}

    @torch.no_grad()
    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Inference in row bands of ``workspace`` bytes (whole frames when None), clamped."""
        h, w = x.shape[-2:]
        xp = _pad_to(x.float(), self.config.stride)
        rows = xp.shape[-2]
        if self.workspace:  # the finest level's activations dominate: ~4 planes of widths[0]
            per_row = xp.shape[0] * xp.shape[-1] * self.config.widths[0] * 4 * 4
            rows = max(self.config.stride, self.workspace // max(per_row, 1))
        out = torch.empty_like(xp)
        with autocast_for(x.device, "auto"):
            for i0, i1, o0, o1 in band_plan(xp.shape[-2], rows, self.config.stride,
                                            self.config.halo):
                y = self.net(xp[..., i0:i1, :])
                out[..., o0:o1, :] = y[..., o0 - i0:o1 - i0, :].float()
        return out[..., :h, :w].clamp_(0, 1)

    @torch.no_grad()
    def enhance(self, images: torch.Tensor, visibility: torch.Tensor,
                blur: torch.Tensor) -> EnhanceResult:
        n = images.shape[0]
        b = torch.as_tensor(blur, device=images.device).float().reshape(-1)
        if images.ndim != 4 or images.shape[1] != 3 or b.numel() != n:
            raise ValueError(f"expected a (B, 3, H, W) batch and B blurs, got "
                             f"{tuple(images.shape)} and {b.numel()}")
        routes = ["deblur" if float(bi) >= self.full_blur else "skip" for bi in b.tolist()]
        out = images.float().clone()
        res = EnhanceResult(images=out, route=routes, deblur=["off"] * n,
                            deblur_kernel_px=torch.full((n,), float("nan"),
                                                        device=images.device))
        stage = LearnedDeblur(self, self.gate_settings)
        for i, route in enumerate(routes):
            if route == "deblur":
                r = stage(out[i:i + 1])
                out[i:i + 1] = r.images
                res.deblur[i] = r.decision[0]
        return res


@dataclass(frozen=True)
class LearnedDeblurSettings:
    """The learned route's knobs: its weights (None: the shipped ones) and its gate."""

    weights: str | None = None
    min_gain: float = 1.02  # sharpness ratio the output must reach
    max_ringing: float = 3.0  # flat-region change allowed, in noise sigmas (+ 0.01 floor)
    gate: bool = True  # False: always apply (ablations)

    def diff_tag(self) -> str:
        base, now = dataclasses.asdict(LearnedDeblurSettings()), dataclasses.asdict(self)
        now.pop("weights"), base.pop("weights")
        return "".join(f"-{k}{now[k]:g}" for k in sorted(now) if now[k] != base[k])


@dataclass
class LearnedDeblur:
    """The stage: ``__call__(images)`` -> :class:`~varlide.models.deblur.DeblurResult`."""

    model: Restorer
    settings: LearnedDeblurSettings = field(default_factory=LearnedDeblurSettings)

    def tag(self) -> str:
        return f"deblur-learned-{self.model.version[:8]}{self.settings.diff_tag()}"

    def to(self, device: torch.device | str) -> LearnedDeblur:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> DeblurResult:
        s = self.settings
        x = images.float()
        self.model.to(x.device)
        out = self.model.restore(x)
        n = x.shape[0]
        nan = torch.full((n,), float("nan"), device=x.device)
        if s.gate:
            decisions = gate(x, out, nan, noise_sigma(x).mean(dim=1), min_length=0.0,
                             min_gain=s.min_gain, max_ringing=s.max_ringing)
        else:
            decisions = ["applied"] * n
        keep = torch.tensor([d == "applied" for d in decisions], device=x.device)
        result = torch.where(keep[:, None, None, None], out, x).to(images.dtype)
        return DeblurResult(result, decisions, nan, x.new_zeros(n, 1, 1), nan.clone())


def learned_deblur(options: dict[str, Any]) -> LearnedDeblur:
    """The stage from ``enhancer_options: {deblur: {method: learned, ...}}`` fields."""
    known = {f.name for f in dataclasses.fields(LearnedDeblurSettings)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"deblur (learned): unknown setting(s) {sorted(unknown)}; known: "
                         f"method, {', '.join(sorted(known))}")
    s = LearnedDeblurSettings(**options)
    return LearnedDeblur(_make_restorer(s.weights).eval(), s)


@ENHANCERS.register(NAME, trainable=True, model=Restorer, default_loss="restore",
                    ships_weights=False, paired=True,
                    train_defaults={"lr": 1e-3, "lr_final": 0.02, "warmup": 100, "crop": 128,
                                    "batch_size": 8, "weight_decay": 0.0, "grad_clip": 1.0,
                                    "val_crop": 192, "val_every": 500,
                                    "checkpoint_every": 500})
def _make_restorer(weights: str | None = None, **kw: Any) -> Restorer:
    """``weights=None``: the shipped weights (varlide/models/shipped/restorer/)."""
    if weights is None:
        folder = default_weights_dir(NAME)
        if not (folder / WEIGHTS_FILE).is_file():
            raise missing_default_weights(NAME)
        weights = str(folder)
    return Restorer.from_pretrained(weights, **kw)
