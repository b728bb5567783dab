"""The zero-reference training losses (pure torch; no ground truth anywhere).

VAR-LIDE's four (the paper's total is ``L_ex + l_en L_en + l_con L_con + l_tv L_tv``):

- :func:`exposure_loss` with :func:`exposure_offset`: the mean of every 16x16 patch of the
  output (channel mean, like Zero-DCE) is pulled towards ``E + E_d`` with the paper's
  E = 0.45 (:class:`VarlideLoss` trains with E = 0.5 and weight 20: measured, the other terms
  hold dark outputs ~0.05-0.08 below the target) and an adaptive offset E_d in
  [-0.1, 0.1]. What drives E_d (``mode``):

  * ``"local"`` (default): the input's own relative brightness, per patch,
    ``E_d = 0.1 * tanh(ln((p_in + 0.01) / (m_in + 0.01)))`` with ``p_in`` the patch's input
    mean and ``m_in`` the image's. A patch that was twice as bright as its image in the
    input aims 0.06 higher, one half as bright 0.06 lower: the ordering of regions (a lit
    shop front vs the street) survives, where a single target for every patch (Zero-DCE's
    0.6) flattens global contrast. The image's mean target stays about E.
  * ``"visibility"``: the prior's v, ``E_d = 0.1 * (2 v - 1)``: darker frames (more noise to
    amplify) aim lower, well-lit frames a little higher.
  * ``"none"``: E_d = 0 (a fixed E, Zero-DCE's loss with E = 0.45).

  E_d is computed from the input (no gradient); it is a target, not a prediction.
- :func:`structural_entropy`: Shannon entropy of the magnitude of the inverse FFT of the
  refined phase alone (unit amplitude), normalised by ln(H W) to [0, 1]. The phase-only
  image of a structured scene puts its energy on edges (low entropy); ghost copies of edges
  (blur's repeated structures) and noise spread it (high entropy). ``sign`` +1 (default)
  minimises it; -1 maximises it (the sign is an ablation).
- :func:`structural_contrast`: minus the mean variance of the grey image over a 4x4 grid of
  16 patches (more local contrast = lower loss; 0 for a flat image, -0.25 at best).
- :func:`total_variation`: Zero-DCE's squared-difference TV, applied to the curve maps
  (``tv``, smooth curves, Zero-DCE's L_tvA) and optionally to the output image
  (``tv_image``, against noise).

Zero-DCE's others, for the ``zero-dce`` baseline and as candidates: :func:`spatial_consistency`
(L_spa, neighbour differences of 4x4-pooled grey kept as in the input) and
:func:`color_constancy` (L_col, grey-world on the channel means).

:class:`ZeroDCELoss` and :class:`VarlideLoss` combine them with weights given as data
(a dict), and return ``(total, terms)`` where ``terms`` holds every unweighted term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

EXPOSURE_LEVEL = 0.45  # the paper's E (exposure_loss's default target)
# VarlideLoss's E: the exposure term is balanced against spatial consistency, colour and TV,
# so a dark input's output settles below its target; at E = 0.45 very dark real frames came
# out at 0.375, at E = 0.5 at 0.43 after 200 steps but 0.36 after 800, at E = 0.525 at 0.40
# (the shipped weights; docs/METHOD.md, "Exposure level and weight" and "The shipped weights").
TRAINED_EXPOSURE_LEVEL = 0.525
MAX_OFFSET = 0.1
PATCH = 16
ED_MODES = ("local", "visibility", "none")


def grey(x: torch.Tensor) -> torch.Tensor:
    """Channel mean ``(B, 1, H, W)`` (what Zero-DCE's exposure and spatial losses use)."""
    return x.mean(dim=1, keepdim=True)


def _pool(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Average pooling with the patch clipped to the image (tiny crops still work)."""
    k = max(1, min(patch, x.shape[-2], x.shape[-1]))
    return F.avg_pool2d(x, k)


# --------------------------------------------------------------------------- exposure


def exposure_offset(
    x_in: torch.Tensor,
    v: torch.Tensor | None = None,
    mode: str = "local",
    patch: int = PATCH,
    max_offset: float = MAX_OFFSET,
) -> torch.Tensor:
    """E_d, broadcastable to the pooled output ``(B, 1, h, w)``, in [-max_offset, max_offset]."""
    if mode not in ED_MODES:
        raise ValueError(f"E_d mode must be one of {ED_MODES}, got {mode!r}")
    b = x_in.shape[0]
    if mode == "none":
        return torch.zeros(b, 1, 1, 1, device=x_in.device)
    if mode == "visibility":
        if v is None:
            raise ValueError("E_d mode 'visibility' needs the visibility scores v")
        vv = v.float().reshape(-1, 1, 1, 1).to(x_in.device)
        return (max_offset * (2 * vv - 1)).clamp(-max_offset, max_offset)
    with torch.no_grad():
        g = grey(x_in.float())
        p = _pool(g, patch)
        m = g.mean(dim=(-2, -1), keepdim=True)
        return max_offset * torch.tanh(torch.log((p + 0.01) / (m + 0.01)))


def exposure_loss(
    y: torch.Tensor, target: torch.Tensor | float = EXPOSURE_LEVEL, patch: int = PATCH
) -> torch.Tensor:
    """Mean over 16x16 patches of (patch mean of the grey output - target)^2."""
    p = _pool(grey(y.float()), patch)
    return ((p - target) ** 2).mean()


# --------------------------------------------------------------------------- structure


def structural_entropy(phase: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised entropy in [0, 1] of |irfft2(e^{i phase})| per image/channel, mean.

    ``phase`` is an rfft2 half-spectrum phase ``(B, C, H, W//2+1)`` in radians; ``size``
    the spatial ``(H, W)``.
    """
    h, w = size
    with torch.autocast(phase.device.type, enabled=False):
        ph = phase.float()
        z = torch.fft.irfft2(torch.polar(torch.ones_like(ph), ph), s=(h, w), norm="ortho")
        mag = z.abs() + 1e-12
        p = mag / mag.sum(dim=(-2, -1), keepdim=True)
        ent = -(p * torch.log(p)).sum(dim=(-2, -1)) / math.log(h * w)
    return ent.mean()


def image_phase(y: torch.Tensor) -> torch.Tensor:
    """The rfft2 phase of an image, for models without VGPM (gradient-safe at |X| = 0)."""
    from varlide.models.vgpm import safe_angle

    with torch.autocast(y.device.type, enabled=False):
        return safe_angle(torch.fft.rfft2(y.float(), norm="ortho"))


def structural_contrast(y: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Minus the mean variance of the grey image over a ``grid x grid`` (16) patch split."""
    g = grey(y.float())
    b, _, h, w = g.shape
    ph, pw = h // grid, w // grid
    if ph < 1 or pw < 1:
        raise ValueError(f"image {h}x{w} too small for a {grid}x{grid} patch grid")
    g = g[..., : ph * grid, : pw * grid].reshape(b, grid, ph, grid, pw)
    var = g.permute(0, 1, 3, 2, 4).reshape(b, grid * grid, ph * pw).var(dim=-1, unbiased=False)
    return -var.mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Zero-DCE's L_TV: ``2 (sum dh^2 / count_h + sum dw^2 / count_w) / B``.

    The sums run over channels too, so the value scales with the channel count (24 curve
    maps in Zero-DCE, whose weight 200 assumes exactly that).
    """
    x = x.float()
    b, _, h, w = x.shape
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum() / max(1, (h - 1) * w)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum() / max(1, h * (w - 1))
    return 2 * (dh + dw) / b


def spatial_consistency(y: torch.Tensor, x_in: torch.Tensor, pool: int = 4) -> torch.Tensor:
    """Zero-DCE's L_spa: differences of 4x4-pooled grey to the 4 neighbours, output vs input.

    Borders are replicate-padded (a border cell's outward difference is 0); Zero-DCE's
    zero padding compares border cells with black, which penalises brightening there.
    """

    def diffs(img: torch.Tensor) -> list[torch.Tensor]:
        p = _pool(grey(img.float()), pool)
        pad = F.pad(p, (1, 1, 1, 1), mode="replicate")
        c = pad[..., 1:-1, 1:-1]
        return [c - pad[..., 1:-1, :-2], c - pad[..., 1:-1, 2:],
                c - pad[..., :-2, 1:-1], c - pad[..., 2:, 1:-1]]

    with torch.no_grad():
        d_in = diffs(x_in)
    d_out = diffs(y)
    return sum(((a - b) ** 2) for a, b in zip(d_in, d_out, strict=True)).mean()


def color_constancy(y: torch.Tensor) -> torch.Tensor:
    """Zero-DCE's L_col: ``sqrt(D_rg^2 + D_rb^2 + D_gb^2)``, ``D_pq = (mean_p - mean_q)^2``."""
    m = y.float().mean(dim=(-2, -1))
    r, g, b = m[:, 0], m[:, 1], m[:, 2]
    d = torch.stack([(r - g) ** 2, (r - b) ** 2, (g - b) ** 2], dim=1)
    return torch.sqrt((d**2).sum(dim=1) + 1e-12).mean()


# --------------------------------------------------------------------------- compositions


class _Composite(nn.Module):
    defaults: dict[str, float] = {}

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        w = dict(self.defaults)
        if weights:
            unknown = set(weights) - set(self.defaults)
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: unknown loss term(s) {sorted(unknown)}; "
                    f"known: {sorted(self.defaults)}"
                )
            w.update({k: float(v) for k, v in weights.items()})
        self.weights = w

    _options: tuple[str, ...] = ()

    def describe(self) -> dict:
        """The effective weights and options (recorded with trained weights: defaults change)."""
        return {"weights": dict(self.weights), **{k: getattr(self, k) for k in self._options}}

    def combine(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = sum(self.weights[k] * t for k, t in terms.items())
        return total, {k: float(t.detach()) for k, t in terms.items()}


class ZeroDCELoss(_Composite):
    """Zero-DCE's objective: ``200 L_tvA + 1 L_spa + 5 L_col + 10 L_exp(E = 0.6)``."""

    defaults = {"tv": 200.0, "spa": 1.0, "col": 5.0, "exp": 10.0}
    _options = ("exposure_level", "patch")

    def __init__(
        self, weights: Mapping[str, float] | None = None, exposure_level: float = 0.6,
        patch: int = PATCH,
    ) -> None:
        super().__init__(weights)
        self.exposure_level = float(exposure_level)
        self.patch = int(patch)

    def forward(self, out: Mapping, x_in: torch.Tensor, v=None, b=None):
        y = out["image"]
        terms = {
            "tv": total_variation(out["maps"]),
            "spa": spatial_consistency(y, x_in),
            "col": color_constancy(y),
            "exp": exposure_loss(y, self.exposure_level, self.patch),
        }
        terms = {k: t for k, t in terms.items() if self.weights[k] != 0}
        return self.combine(terms)


class VarlideLoss(_Composite):
    """The paper's four terms plus the Zero-DCE candidates, weights as data.

    ``exp`` adaptive exposure (E, E_d ``ed_mode``), ``en`` structural entropy (times
    ``entropy_sign``), ``con`` structural contrast, ``tv`` TV of the curve maps,
    ``tv_image`` TV of the output, ``spa`` spatial consistency, ``col`` colour constancy.
    A weight of 0 skips the term's computation.
    """

    defaults = {"exp": 20.0, "en": 1.0, "con": 1.0, "tv": 200.0, "tv_image": 0.0,
                "spa": 1.0, "col": 5.0}
    _options = ("exposure_level", "ed_mode", "max_offset", "entropy_sign", "patch")

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        exposure_level: float = TRAINED_EXPOSURE_LEVEL,
        ed_mode: str = "local",
        max_offset: float = MAX_OFFSET,
        entropy_sign: float = 1.0,
        patch: int = PATCH,
    ) -> None:
        super().__init__(weights)
        if ed_mode not in ED_MODES:
            raise ValueError(f"ed_mode must be one of {ED_MODES}, got {ed_mode!r}")
        if entropy_sign not in (1.0, -1.0):
            raise ValueError(f"entropy_sign must be +1 or -1, got {entropy_sign}")
        self.exposure_level = float(exposure_level)
        self.ed_mode = ed_mode
        self.max_offset = float(max_offset)
        self.entropy_sign = float(entropy_sign)
        self.patch = int(patch)

    def forward(self, out: Mapping, x_in: torch.Tensor, v: torch.Tensor | None = None, b=None):
        y = out["image"]
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        if w["exp"]:
            ed = exposure_offset(x_in, v, self.ed_mode, self.patch, self.max_offset)
            terms["exp"] = exposure_loss(y, self.exposure_level + ed, self.patch)
        if w["en"]:
            phase = out.get("phase")
            if phase is None:
                phase = image_phase(y)
            terms["en"] = self.entropy_sign * structural_entropy(phase, tuple(y.shape[-2:]))
        if w["con"]:
            terms["con"] = structural_contrast(y)
        if w["tv"]:
            terms["tv"] = total_variation(out["maps"])
        if w["tv_image"]:
            terms["tv_image"] = total_variation(y)
        if w["spa"]:
            terms["spa"] = spatial_consistency(y, x_in)
        if w["col"]:
            terms["col"] = color_constancy(y)
        return self.combine(terms)


class RestoreLoss(_Composite):
    """The restorer's supervised objective on synthetic pairs: Charbonnier distance to the
    clean reference (``out["reference"]``, which the trainer adds for paired models) and,
    optionally, the L1 distance of the two images' 2-D spectra (``freq``, MIMO-UNet's
    frequency term: it weighs the high frequencies a blur removes)."""

    defaults = {"l1": 1.0, "freq": 0.0}

    def forward(self, out: Mapping, x_in: torch.Tensor, v=None, b=None):
        y, ref = out["image"], out.get("reference")
        if ref is None:
            raise ValueError("restore loss: the batch carries no reference (a paired model "
                             "is trained on degraded / clean pairs)")
        terms = {"l1": torch.sqrt((y - ref).square() + 1e-6).mean()}
        if self.weights["freq"]:
            terms["freq"] = (torch.fft.rfft2(y.float()) - torch.fft.rfft2(ref.float())
                             ).abs().mean() / (y.shape[-1] * y.shape[-2]) ** 0.5
        return self.combine(terms)


LOSSES = {"zero-dce": ZeroDCELoss, "varlide": VarlideLoss, "restore": RestoreLoss}


def create_loss(name: str, **kwargs) -> _Composite:
    """``zero-dce``, ``varlide`` or ``restore`` with keyword options (``weights={...}`` etc.)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
