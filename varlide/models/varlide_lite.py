"""``varlide-lite``: VICM -> [backbone slot] -> VGPM, with score-based routing.

This is VAR-LIDE without its VAR backbone (and so without SF-RoPE): never call it VAR-LIDE.
Inputs are images ``(B, 3, H, W)`` in [0, 1] and the prior's v (visibility) and b (blur).

The backbone slot (``VarlideLiteConfig.backbone``) holds ``identity`` (nothing) or
``denoise``, a weight-free noise-adaptive filter (``varlide.models.denoise``: the curve's
amplified sensor noise, estimated and removed) standing in for a learned restoration
backbone. A backbone is called as ``backbone(curve_output, input)``. It runs on the
``curve`` and ``full`` routes; ``set_inference(backbone=...)`` (``enhancer_options``)
overrides the weights' choice, and a non-identity backbone is part of the ``version``
(``<sha12>+ds4+denoise-w1.5-k1+hl``), so rows say what produced them.

Routing (per image, by thresholds on v and b; constructor arguments, defaults below):

    skip   if skip_visibility[0] <= v <= skip_visibility[1]    output = input, no compute
    full   elif b >= full_blur (and the weights have VGPM)     VICM, backbone, VGPM
    curve  otherwise                                          VICM, backbone

Exposure decides first: a well-exposed frame is left alone whatever its blur score. With
blur first, well-lit motion-blurred frames went down the curve and were re-exposed
(measured on the synthetic-blur set: 24.8 dB input -> 14.3 dB output, 19 of 20 frames made
worse; exposure first: 20.4 dB, 5 worse; docs/METHOD.md, "Highlights and routing").

After the clamp, every enhanced image goes through ``tone.protect_highlights`` (unless
``highlights=False``): luma above 0.8 rolls off towards 0.97 and never reaches white where
the input was not white, so the over-exposed fraction of an output is at most its input's.

Defaults, on the ``analytic`` prior's scale (``varlide.priors.analytic``):
``skip_visibility = (0.87, 0.97)`` is exposure E in [0.40, 0.60] (v = E^4 / (E^4 + 0.25^4)):
a frame already in the exposure band the losses aim for (0.45 +- 0.1) is left alone, while
darker frames are brightened and over-exposed ones (v > 0.97) still darkened.
``full_blur = 0.30``: measured on every 20th train-sice photograph (512 px, light
Poisson-Gaussian noise added), the analytic b is median 0.22 / 90th percentile 0.27 when
sharp, median 0.27 / 0.32 / 0.35 after a 5 / 9 / 15 px motion blur; so at 0.30 nine in ten
sharp frames skip VGPM and most frames blurred by 9 px or more get it. (b is scale
dependent: blur is measured on a copy of at most 512 px; noise reads as sharpness.)
``skip_visibility=None`` never skips; ``full_blur=0`` sends every non-skipped image through
VGPM (evaluation uses ``skip_visibility=None, full_blur=0``: always full).

Weights: ``save_pretrained(dir)`` writes ``model.safetensors`` and ``config.json`` (the
architecture, the prior backend and model whose v/b scale training used, the sha256 of the
weights file, and what the trainer adds); ``from_pretrained(path_or_uri)`` reads a folder
or the ``.safetensors`` file (with ``config.json`` beside it) from any fsspec URI. The
``version`` is the first 12 hex digits of the weights file's sha256 (``sha256sum``), plus
the backbone's tag when it is not the identity.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varlide.models.backbones import build_backbone
from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, autocast_for
from varlide.models.curve_net import curve_in_bands, images_per_call
from varlide.models.deblur import BlindDeblur, DeblurSettings
from varlide.models.pretrained import (  # noqa: F401  (re-exported: the old home)
    CONFIG_FILE,
    FORMAT,
    WEIGHTS_DIR,
    WEIGHTS_FILE,
    Pretrained,
    check_state_dict,
    default_weights_dir,
    missing_default_weights,
    weights_sha256,
)
from varlide.models.tiling import band_rows
from varlide.models.tone import protect_highlights
from varlide.models.vgpm import LOW_BAND, VGPM
from varlide.models.vicm import VICM

log = logging.getLogger(__name__)

SKIP_VISIBILITY = (0.87, 0.97)
FULL_BLUR = 0.30
PRECISIONS = ("auto", "fp32", "bf16")
HIGHLIGHTS_TAG = "hl"  # in ``version`` when outputs go through ``tone.protect_highlights``


def deblur_stage(option: bool | str | dict[str, Any] | None):
    """The ``deblur`` inference option: False/None (off); True or ``blind``
    (``DeblurSettings()``); ``learned`` (``varlide.models.restorer.LearnedDeblur`` with the
    weights in ``varlide/models/shipped/restorer/``: none ship yet, docs/METHOD.md); or a
    dict: ``method`` (``blind``, the default, or ``learned``, whose ``weights`` names a
    ``varlide train --enhancer restorer`` output) and that method's settings."""
    if option is None or option is False:
        return None
    if option is True:
        option = {"method": "blind"}
    if isinstance(option, str):
        option = {"method": option}
    if not isinstance(option, dict):
        raise ValueError("deblur: expected true, false, 'blind', 'learned' or a dict of "
                         f"settings, got {option!r}")
    settings = dict(option)
    method = settings.pop("method", "blind")
    if method == "learned":
        from varlide.models.restorer import learned_deblur

        return learned_deblur(settings)
    if method != "blind":
        raise ValueError(f"deblur: method must be 'blind' or 'learned', got {method!r}")
    known = {f.name for f in dataclasses.fields(DeblurSettings)}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"deblur: unknown setting(s) {sorted(unknown)}; known: method, "
                         f"{', '.join(sorted(known))}")
    return BlindDeblur(DeblurSettings(**settings))


# --------------------------------------------------------------------------- the model


@dataclass
class VarlideLiteConfig:
    """Architecture (saved in config.json; changing it needs new weights)."""

    n_iter: int = 8  # N: curve iterations / map triples
    width: int = 32  # curve-net channels
    downscale: float = 1.0  # curve maps estimated on a 1/downscale copy (Zero-DCE++), 1 = off
    vicm: bool = True  # Theta_v truncation (False: fixed N iterations)
    vgpm: bool = True  # phase modulation after the curve
    vgpm_steps: int = 8  # T
    vgpm_width: int = 16  # Psi_p channels
    low_band: float = LOW_BAND  # VGPM keeps |f| < low_band (cycles/px) out, tapered to 2x
    hidden: int = 16  # Theta_v / Theta_b hidden units
    backbone: str = "identity"  # the slot between VICM and VGPM: identity | denoise
    # Inference: curve maps on a 1/k copy (None: ``downscale``, as trained). The shipped
    # weights say 4 (measured: no quality cost, 12x less curve-net work; docs/METHOD.md);
    # ``enhancer_options: {downscale: 1}`` runs them at full resolution.
    inference_downscale: float | None = None
    denoise_window: float = 1.5  # denoise: Gaussian sigma (px) of the local statistics
    denoise_strength: float = 1.0  # denoise: factor on the estimated noise
    # any other backbone's options (keywords of its registered factory)
    backbone_options: dict[str, Any] = field(default_factory=dict)

    def backbone_kwargs(self) -> dict[str, Any]:
        """The slot's options: the denoiser's two fields, then ``backbone_options``."""
        return {"window": self.denoise_window, "strength": self.denoise_strength,
                **self.backbone_options}


class VarlideLite(Pretrained, Enhancer):
    """VICM + VGPM with routing. Training calls ``forward``; the engine calls ``enhance``."""

    name = "varlide-lite"
    config_class = VarlideLiteConfig

    def __init__(
        self,
        config: VarlideLiteConfig | None = None,
        *,
        skip_visibility: tuple[float, float] | None = SKIP_VISIBILITY,
        full_blur: float = FULL_BLUR,
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        downscale: float | None = None,
        backbone: str | None = None,
        highlights: bool = True,
        deblur: bool | str | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.config = config or VarlideLiteConfig()
        c = self.config
        self.vicm = VICM(n_iter=c.n_iter, width=c.width, downscale=c.downscale, adaptive=c.vicm,
                         hidden=c.hidden)
        self.vgpm = (VGPM(steps=c.vgpm_steps, width=c.vgpm_width, low_band=c.low_band,
                          hidden=c.hidden) if c.vgpm else None)
        self.weights_version = "untrained"
        self.trained_prior = "analytic"
        self.trained_prior_model = None
        self.pretrained_info: dict[str, Any] = {}
        self.set_inference(skip_visibility=skip_visibility, full_blur=full_blur,
                           precision=precision, channels_last=channels_last, compile=compile,
                           downscale=downscale, backbone=backbone, highlights=highlights,
                           deblur=deblur)

    @property
    def version(self) -> str:
        """The weights' sha256 prefix, plus ``+ds<k>`` when the curve maps are estimated on a
        1/k copy, the backbone's tag (``+denoise-...``) if any and ``+hl`` when highlights
        are protected: what produced a row."""
        k = self.effective_downscale
        tags = [f"ds{k:g}"] if k != 1 else []
        tags += [self.backbone.tag()] if self.backbone.tag() else []
        tags += [self.deblur.tag()] if self.deblur is not None else []
        tags += [HIGHLIGHTS_TAG] if self.highlights else []
        return "+".join([self.weights_version, *tags])

    @version.setter
    def version(self, value: str) -> None:
        self.weights_version = value

    @property
    def effective_downscale(self) -> float:
        """The 1/k copy inference estimates the curve maps on: the option, else the config's
        inference value, else what training used."""
        if self.downscale is not None:
            return float(self.downscale)
        c = self.config
        return float(c.downscale if c.inference_downscale is None else c.inference_downscale)

    def set_backbone(self, name: str) -> None:
        """Put ``name`` in the backbone slot and record it in the config (what
        ``save_pretrained`` writes); the weights are unchanged (the slot has no parameters)."""
        c = dataclasses.replace(self.config, backbone=name)
        self.backbone = build_backbone(name, **c.backbone_kwargs())
        self.config = c
        self._compiled = {}  # compiled routes captured the old slot

    def set_inference(
        self,
        skip_visibility: tuple[float, float] | None = SKIP_VISIBILITY,
        full_blur: float = FULL_BLUR,
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        downscale: float | None = None,
        backbone: str | None = None,
        highlights: bool = True,
        deblur: bool | str | dict[str, Any] = False,
    ) -> None:
        """Inference-only settings (routing thresholds, precision, the backbone slot ...);
        weights unchanged. ``backbone=None``: the one the config (the weights) names."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if skip_visibility is not None:
            lo, hi = (float(t) for t in skip_visibility)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"skip_visibility must be 0 <= lo <= hi <= 1, got {lo}, {hi}")
            skip_visibility = (lo, hi)
        if downscale is not None and downscale < 1:
            raise ValueError(f"downscale must be >= 1, got {downscale}")
        self.skip_visibility = skip_visibility
        self.full_blur = float(full_blur)
        self.precision = precision
        self.channels_last = channels_last
        self.use_compile = bool(compile)
        self.downscale = downscale
        self.highlights = bool(highlights)
        self.deblur = deblur_stage(deblur)
        self.set_workspace(self.workspace)
        c = self.config
        self.backbone = build_backbone(backbone or c.backbone, **c.backbone_kwargs())
        self._compiled: dict[str, Any] = {}

    def set_workspace(self, nbytes: int | None) -> None:
        """The memory budget of one step, for the curve's bands and a learned deblurring
        stage's (the blind stage works on whole-frame planes)."""
        super().set_workspace(nbytes)
        if hasattr(self.deblur, "model"):
            self.deblur.model.set_workspace(nbytes)

    # ---------------------------------------------------------------- training forward

    def forward(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        b: torch.Tensor,
        mask: str = "soft",
        temperature: float = 0.1,
        downscale: float | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Every route 'full'. Returns ``image`` (not clipped), ``curve_image``, ``maps``,
        ``tau``, ``weights``, ``n_iter``, ``phase`` (VGPM's refined phase or None) and
        ``strength`` (s(b) or None)."""
        r = self.vicm(x, v, mask=mask, temperature=temperature, downscale=downscale)
        y = self.backbone(r["image"], x)
        out: dict[str, torch.Tensor | None] = {
            "curve_image": r["image"], "maps": r["maps"], "tau": r["tau"],
            "weights": r["weights"], "n_iter": r["n_iter"], "phase": None, "strength": None,
        }
        if self.vgpm is not None:
            g = self.vgpm(y, b)
            y = g["image"]
            out.update(phase=g["phase"], strength=g["strength"])
        out["image"] = y
        return out

    # ---------------------------------------------------------------- inference

    def routes(self, v: torch.Tensor, b: torch.Tensor) -> list[str]:
        """Per-image route by the thresholds (see the module docstring): exposure first."""
        out = []
        band = self.skip_visibility
        for vi, bi in zip(v.float().cpu().tolist(), b.float().cpu().tolist(), strict=True):
            blurred = bi >= self.full_blur
            if band and band[0] <= vi <= band[1]:
                out.append("deblur" if blurred and self.deblur is not None else "skip")
            elif blurred and self.vgpm is not None:
                out.append("full")
            else:
                out.append("curve")
        return out

    def _curve(self, x: torch.Tensor, v: torch.Tensor):
        """VICM then the backbone slot, in row bands of ``self.workspace`` bytes; a batch
        whose bands would be thin (a few rows of every image at once) goes image by image."""
        _, weights, n_iter = self.vicm.truncation(v, mask="hard")
        k = self.effective_downscale
        step = images_per_call(x.shape[0], x.shape[-1], k, self.workspace)
        if step >= x.shape[0]:
            return self._curve_chunk(x, weights, k), n_iter
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], step):
            out[i:i + step] = self._curve_chunk(x[i:i + step], None if weights is None
                                                else weights[i:i + step], k)
        return out, n_iter

    def _curve_chunk(self, xi: torch.Tensor, wi: torch.Tensor | None, k: float) -> torch.Tensor:
        sigma = self.backbone.prepare(xi, band_rows(xi.shape[0], xi.shape[-1], 16,
                                                    self.workspace))

        def post(y: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
            return self.backbone(y, xb, sigma)

        return curve_in_bands(self.vicm.curve, xi, wi, post, self.backbone.halo, k,
                              self.workspace)

    def _full(self, x: torch.Tensor, v: torch.Tensor, b: torch.Tensor):
        img, n = self._curve(x, v)
        g = self.vgpm(img, b)
        return g["image"], n, g["strength"]

    def _fn(self, key: str):
        fn = self._curve if key == "curve" else self._full
        if not self.use_compile:
            return fn
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=None)
        return self._compiled[key]

    def _deblurred(self, y: torch.Tensor, b: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The deblurring stage, in place on ``y``, for the images whose blur score reaches
        ``full_blur`` (the others: ``off``), one image at a time (its FFTs are whole-frame
        planes); returns the decisions and kernel lengths (NaN where not attempted)."""
        n = y.shape[0]
        decisions = ["off"] * n
        px = torch.full((n,), float("nan"), device=y.device)
        for i, bi in enumerate(b.float().cpu().tolist()):
            if bi < self.full_blur:
                continue
            r = self.deblur(y[i:i + 1])
            y[i:i + 1] = r.images
            decisions[i], px[i] = r.decision[0], r.kernel_px[0]
        return decisions, px

    def _route(self, key: str, x: torch.Tensor, v: torch.Tensor, b: torch.Tensor):
        """One route on its images: (output clamped to [0, 1], iterations, VGPM strength or
        None, deblur decisions or None, kernel px or None)."""
        strength = decisions = px = None
        with autocast_for(x.device, self.precision):
            if key == "deblur":
                y, it = x.float().clone(), torch.zeros(x.shape[0], device=x.device)
            elif key == "full" and self.deblur is None:
                y, it, strength = self._fn(key)(x, v, b)
            else:
                y, it = self._fn("curve")(x, v)
        y = y.float().clamp_(0, 1).contiguous()
        if self.deblur is not None:
            decisions, px = self._deblurred(y, b)
            if key == "full":
                with autocast_for(x.device, self.precision):
                    g = self.vgpm(y, b)
                y, strength = g["image"].float().clamp_(0, 1).contiguous(), g["strength"]
        if self.highlights:
            protect_highlights(y, x)
        return y, it.to(torch.int16), strength, decisions, px

    @torch.no_grad()
    def enhance(
        self, images: torch.Tensor, visibility: torch.Tensor, blur: torch.Tensor
    ) -> EnhanceResult:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        n = images.shape[0]
        dev = images.device
        v = torch.as_tensor(visibility, device=dev).float().reshape(-1)
        b = torch.as_tensor(blur, device=dev).float().reshape(-1)
        if v.numel() != n or b.numel() != n:
            raise ValueError(f"{v.numel()} visibilities / {b.numel()} blurs for {n} images")
        routes = self.routes(v, b)
        x = images.float()
        cl = self.channels_last if self.channels_last is not None else dev.type == "cuda"
        out = x.clone() if "skip" in routes else None  # a skipped image is its input
        res = EnhanceResult(
            images=x, route=routes, n_iter=torch.zeros(n, dtype=torch.int16, device=dev),
            phase_strength=torch.zeros(n, device=dev) if self.vgpm else None,
            deblur=["off"] * n if self.deblur is not None else None,
            deblur_kernel_px=(torch.full((n,), float("nan"), device=dev)
                              if self.deblur is not None else None))
        for key in ("curve", "full", "deblur"):
            sel = [i for i, r in enumerate(routes) if r == key]
            if not sel:
                continue
            idx = torch.tensor(sel, device=dev)
            xs = x if len(sel) == n else x.index_select(0, idx)
            if cl:
                xs = xs.contiguous(memory_format=torch.channels_last)
            y, it, strength, decisions, px = self._route(
                key, xs, v.index_select(0, idx), b.index_select(0, idx))
            if len(sel) == n:
                out = y
            else:
                if out is None:
                    out = torch.empty_like(x)
                out.index_copy_(0, idx, y)
            res.n_iter.index_copy_(0, idx, it)
            if strength is not None:
                res.phase_strength.index_copy_(0, idx, strength.float())
            if decisions is not None:
                for j, i in enumerate(sel):
                    res.deblur[i] = decisions[j]
                res.deblur_kernel_px.index_copy_(0, idx, px.float())
        res.images = out.to(images.dtype) if images.is_floating_point() else out
        return res

    # ---------------------------------------------------------------- weights


@ENHANCERS.register("varlide-lite", trainable=True, model=VarlideLite, default_loss="varlide",
                    ships_weights=True, backbone_slot=True)
def _make_varlide_lite(weights: str | None = None, **kw) -> VarlideLite:
    """``weights=None``: the shipped default weights (varlide/models/shipped/varlide-lite/)."""
    if weights is None:
        folder = default_weights_dir("varlide-lite")
        if not (folder / WEIGHTS_FILE).is_file():
            raise missing_default_weights("varlide-lite")
        weights = str(folder)
        model = VarlideLite.from_pretrained(weights, **kw)
        _note_shipped_licence(model.version, folder)
        return model
    return VarlideLite.from_pretrained(weights, **kw)


_LICENCE_NOTED: set[str] = set()


def _note_shipped_licence(version: str, folder: Path) -> None:
    """Once per process: the shipped weights inherit their training data's research-use terms,
    and the default enhancer uses them, so say so where a user will see it."""
    if version in _LICENCE_NOTED:
        return
    _LICENCE_NOTED.add(version)
    logging.getLogger("varlide").warning(
        "varlide-lite: using the shipped weights %s, trained on SICE images distributed for "
        "research use only; the weights inherit that restriction (%s). For other uses train "
        "your own (`varlide train`) or use `--enhancer classic-curve` (no weights).",
        version, folder / "MODEL_CARD.md")
