"""Weight-free blind motion deblurring with a per-image do-no-harm gate (pure torch).

Why this design (docs/METHOD.md, "Deblurring"): the kernel estimate is the whole problem,
so it follows the L0 gradient-prior family that is known to work on natural images
(Xu, Zheng & Jia 2013; Pan et al. 2014/2016), and everything is a batched FFT, so it runs
the same on CPU and GPU:

1. **Estimation copy.** The luma of the (brightened, denoised) frame, scaled so its long
   side is at most ``estimate_side``, then the ``crop`` x ``crop`` window with the most edge
   energy. Pixels near saturated light sources (luma >= ``saturation``, dilated by the
   kernel size) are masked out of the kernel step: a blurred street lamp is not a step edge,
   and it breaks the linear blur model when it clips.
2. **Coarse to fine.** Levels at 1/sqrt(2) steps, the kernel growing from 3 px to
   ``kernel_size``; at each level alternate
   - latent: ``min ||k * x - y||^2 + lam ||grad x||_0`` by half-quadratic splitting
     (hard-thresholded gradients, then one FFT solve per beta, beta doubling);
   - kernel: ``min ||grad x * k - grad y||^2 + gamma ||k||^2`` in closed form (FFT), cropped
     to the support, negatives and values under 5 % of the peak zeroed, normalised.
3. **Non-blind deconvolution** of every channel at full resolution: the frame padded by
   reflection (edge tapering: the FFT's wrap-around has no jump to ring at), then
   ``X = conj(K) Y / (|K|^2 + mu (|Dx|^2 + |Dy|^2))``, mu raised with the frame's noise.
4. **The gate.** The output replaces its input only where a no-reference check says it
   helped: the kernel must be longer than ``min_length`` px (else ``no-blur``), the
   brightness-normalised gradient energy must rise by ``min_gain`` (else ``no-gain``), and
   the change in flat regions (where ringing shows) must stay under ``max_ringing`` times
   the noise level, with no more clipped pixels than the input had (else ``ringing``).

Each image gets a decision (``DECISIONS``) and its kernel's length in full-resolution
pixels; the enhancer writes both to the row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from varlide.models.denoise import gaussian_blur, noise_sigma
from varlide.priors.analytic import LUMA_601

#: What the gate decided, per image: not attempted (the blur prior said sharp), no blur in
#: the kernel, the deconvolution did not sharpen, it rang, or it replaced the input.
DECISIONS = ("off", "no-blur", "no-gain", "ringing", "applied")
_LUMA = LUMA_601  # the one Rec.601 definition


@dataclass(frozen=True)
class DeblurSettings:
    """The stage's knobs (saved in the enhancer's config; part of its version tag)."""

    kernel_size: int = 25  # kernel support (px) at the estimation scale, odd
    estimate_side: int = 1024  # long side of the estimation copy
    crop: int = 320  # the estimation window (px, at the estimation scale)
    iterations: int = 4  # latent/kernel alternations per level
    keep_top: float = 0.0  # >0: only the top keep_top * size * sqrt(N) latent edges vote
    lam: float = 4e-3  # L0 weight of the latent step at the coarsest level
    lam_level_decay: float = 0.8  # each finer level starts at lam x this^level
    lam_decay: float = 0.9  # and decays by this per alternation within the level
    kernel_floor: float = 0.1  # kernel values under this x the peak are dropped
    gamma: float = 2.0  # kernel Tikhonov weight (Pan et al.'s 2)
    mu: float = 3e-4  # deconvolution regulariser (TV weight)
    mu_noise: float = 8.0  # mu += mu_noise * sigma^2 (noisier frames: smoother inverse)
    tv_steps: int = 4  # TV half-quadratic steps; 0 = one quadratic-prior solve (faster)
    saturation: float = 0.95  # luma at which a pixel counts as a clipped light source
    min_length: float = 3.0  # kernel length (px, full resolution) that counts as blur
    min_gain: float = 1.08  # sharpness ratio the output must reach
    max_ringing: float = 3.0  # flat-region change allowed, in noise sigmas (+ 0.01 floor)

    def __post_init__(self) -> None:
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"deblur: kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.crop < 2 * self.kernel_size or self.estimate_side < self.crop:
            raise ValueError("deblur: need estimate_side >= crop >= 2 * kernel_size, got "
                             f"{self.estimate_side}, {self.crop}, {self.kernel_size}")

    def tag(self) -> str:
        """The version tag: only the settings that differ from the defaults are spelled."""
        base, now = asdict(DeblurSettings()), asdict(self)
        diff = "".join(f"-{k}{now[k]:g}" for k in sorted(now) if now[k] != base[k])
        return f"deblur{diff}"


@dataclass
class DeblurResult:
    images: torch.Tensor  # (B, 3, H, W)
    decision: list[str]  # per image, one of DECISIONS
    kernel_px: torch.Tensor  # (B,) float: estimated kernel length, full-resolution px
    kernels: torch.Tensor  # (B, K, K) at the estimation scale (diagnostics, benchmarks)
    scale: torch.Tensor  # (B,) the estimation scale (kernel px * 1/scale = full-res px)


# --------------------------------------------------------------------------- FFT helpers


def psf2otf(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """rFFT of ``(B, k, k)`` kernels zero-padded to ``shape`` with the centre at (0, 0)."""
    b, kh, kw = kernel.shape
    pad = kernel.new_zeros(b, *shape)
    pad[:, :kh, :kw] = kernel
    pad = torch.roll(pad, shifts=(-(kh // 2), -(kw // 2)), dims=(1, 2))
    return torch.fft.rfft2(pad)


def _diff_otfs(shape: tuple[int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """OTFs of the circular forward differences along x and y, ``(1, H, W//2+1)``."""
    h, w = shape
    dx = torch.zeros(1, h, w, device=device, dtype=dtype)
    dy = torch.zeros(1, h, w, device=device, dtype=dtype)
    dx[0, 0, 0], dx[0, 0, -1] = -1.0, 1.0
    dy[0, 0, 0], dy[0, -1, 0] = -1.0, 1.0
    return torch.fft.rfft2(dx), torch.fft.rfft2(dy)


def _grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular forward differences (matching :func:`_diff_otfs`)."""
    return torch.roll(x, -1, dims=-1) - x, torch.roll(x, -1, dims=-2) - x


def _grad_t(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_grad` (minus the divergence)."""
    return (torch.roll(gx, 1, dims=-1) - gx) + (torch.roll(gy, 1, dims=-2) - gy)


# --------------------------------------------------------------------------- estimation


def l0_latent(y: torch.Tensor, otf: torch.Tensor, lam: float, beta_max: float = 1e5,
              kappa: float = 2.0) -> torch.Tensor:
    """``argmin_x ||k * x - y||^2 + lam ||grad x||_0`` by half-quadratic splitting.

    ``y``: (B, H, W); ``otf``: (B, H, W//2+1) of the kernel. Returns (B, H, W)."""
    shape = y.shape[-2:]
    fdx, fdy = _diff_otfs(shape, y.device, y.dtype)
    num0 = otf.conj() * torch.fft.rfft2(y)
    den_k = otf.abs().square()
    den_d = fdx.abs().square() + fdy.abs().square()
    x, beta = y, 2.0 * lam
    while beta < beta_max:
        gx, gy = _grad(x)
        keep = (gx.square() + gy.square()) >= lam / beta
        num = num0 + beta * torch.fft.rfft2(_grad_t(gx * keep, gy * keep))
        x = torch.fft.irfft2(num / (den_k + beta * den_d), s=shape)
        beta *= kappa
    return x


def estimate_kernel_step(x: torch.Tensor, y: torch.Tensor, size: int, gamma: float,
                         mask: torch.Tensor | None = None, cg_steps: int = 20,
                         keep_top: float = 0.0, floor: float = 0.05) -> torch.Tensor:
    """``argmin_k ||grad x * k - grad y||^2 + gamma ||k||^2`` over ``size`` x ``size``
    kernels, on (B, H, W) images, by conjugate gradients on the support (Pan et al.'s
    solver; an unconstrained FFT solve cropped afterwards gives diffuse kernels), then made
    non-negative, small values dropped, sum 1. ``mask`` (B, H, W) zeroes gradients that must
    not vote (saturated light sources)."""
    shape = y.shape[-2:]
    xs, ys = _grad(x), _grad(y)
    if mask is not None:
        xs, ys = [g * mask for g in xs], [g * mask for g in ys]
    if keep_top:  # only the latent's strongest edges vote (Cho & Lee's selection)
        mag = (xs[0].square() + xs[1].square()).flatten(1)
        n = min(mag.shape[1] - 1, int(keep_top * size * math.sqrt(mag.shape[1])))
        thr = mag.topk(n, dim=1).values[:, -1:, None]
        sel = (mag.view_as(xs[0]) >= thr).float()
        xs = [g * sel for g in xs]
    fx = [torch.fft.rfft2(g) for g in xs]
    fy = [torch.fft.rfft2(g) for g in ys]
    power = fx[0].abs().square() + fx[1].abs().square()
    r = size // 2

    def crop(full: torch.Tensor) -> torch.Tensor:  # centred size x size window
        return torch.roll(full, shifts=(r, r), dims=(1, 2))[:, :size, :size]

    def apply(k: torch.Tensor) -> torch.Tensor:  # (M + gamma I) k on the support
        return crop(torch.fft.irfft2(power * psf2otf(k, shape), s=shape)) + gamma * k

    rhs = crop(torch.fft.irfft2(fx[0].conj() * fy[0] + fx[1].conj() * fy[1], s=shape))
    k = torch.full_like(rhs, 1.0 / (size * size))
    res = rhs - apply(k)
    d = res.clone()
    rr = res.square().sum(dim=(1, 2), keepdim=True)
    for _ in range(cg_steps):
        ad = apply(d)
        alpha = rr / (d * ad).sum(dim=(1, 2), keepdim=True).clamp_min(1e-20)
        k = k + alpha * d
        res = res - alpha * ad
        rr_new = res.square().sum(dim=(1, 2), keepdim=True)
        d = res + (rr_new / rr.clamp_min(1e-20)) * d
        rr = rr_new
    return _main_component(normalise_kernel(k, floor))


def normalise_kernel(k: torch.Tensor, floor: float = 0.05) -> torch.Tensor:
    """Non-negative, values under ``floor`` x the peak zeroed, sum 1 (a delta if empty)."""
    k = k.clamp_min(0)
    k = torch.where(k >= floor * k.amax(dim=(1, 2), keepdim=True), k, torch.zeros_like(k))
    s = k.sum(dim=(1, 2), keepdim=True)
    delta = torch.zeros_like(k)
    delta[:, k.shape[1] // 2, k.shape[2] // 2] = 1.0
    return torch.where(s > 1e-8, k / s.clamp_min(1e-8), delta)


def resize_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    if k.shape[-1] == size:
        return k
    # align_corners=False: the content stretches by size_out / size_in, the ratio the image
    # scale changes by between levels (True stretched a 3 px kernel 2x for a 1.67x step)
    up = F.interpolate(k[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return normalise_kernel(up[:, 0], floor=0.0)


def kernel_length(k: torch.Tensor) -> torch.Tensor:
    """The length (px) of a line kernel with the same spread: sqrt(12 var_max + 1), where
    var_max is the larger eigenvalue of the kernel's second-moment matrix; 1 for a delta."""
    b, n, _ = k.shape
    t = torch.arange(n, device=k.device, dtype=k.dtype) - n // 2
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    m = lambda f: (k * f).sum(dim=(1, 2))  # noqa: E731
    mx, my = m(xx), m(yy)
    vxx, vyy, vxy = m(xx * xx) - mx**2, m(yy * yy) - my**2, m(xx * yy) - mx * my
    tr, det = vxx + vyy, vxx * vyy - vxy**2
    lam = tr / 2 + torch.sqrt((tr * tr / 4 - det).clamp_min(0))
    return torch.sqrt(12 * lam.clamp_min(0) + 1)


def kernel_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Max normalised cross-correlation over shifts (Hu & Yang 2012), (B, k, k) kernels of
    equal size: 1 for the same kernel anywhere in the window, lower the more they differ."""
    n = a.shape[-1]
    out = []
    for ai, bi in zip(a, b, strict=True):
        c = F.conv2d(F.pad(ai[None, None], (n // 2,) * 4), bi[None, None])
        out.append(c.max() / (ai.norm() * bi.norm()).clamp_min(1e-12))
    return torch.stack(out)


def _levels(size: int) -> list[int]:
    """Kernel sizes coarse to fine: 1/sqrt(2) steps from ``size`` down to 3, all odd."""
    out = [size]
    while out[-1] > 3:
        nxt = int(round(out[-1] / math.sqrt(2)))
        nxt = max(3, nxt - (1 - nxt % 2))
        out.append(nxt if nxt < out[-1] else out[-1] - 2)
    return out[::-1]


def _window(luma: torch.Tensor, crop: int, sat: torch.Tensor) -> tuple[int, int]:
    """Top-left of the ``crop`` window with the most unmasked edge energy (on a coarse grid)."""
    h, w = luma.shape[-2:]
    if h <= crop and w <= crop:
        return 0, 0
    gx, gy = _grad(luma[None])
    energy = ((gx.abs() + gy.abs()) * (1 - sat))[0, :-1, :-1]
    step = max(8, crop // 4)
    pooled = F.avg_pool2d(energy[None, None], kernel_size=min(crop, h - 1, w - 1) // 1,
                          stride=step)
    idx = int(pooled.flatten().argmax())
    cols = pooled.shape[-1]
    return min((idx // cols) * step, max(0, h - crop)), min((idx % cols) * step, max(0, w - crop))


def estimation_copy(images: torch.Tensor, s: DeblurSettings):
    """(luma window (B, h, w), saturation mask of it, the scale) for kernel estimation."""
    b, _, h, w = images.shape
    scale = min(1.0, s.estimate_side / max(h, w))
    lum = (images[:, 0] * _LUMA[0] + images[:, 1] * _LUMA[1] + images[:, 2] * _LUMA[2])
    if scale < 1:
        lum = F.interpolate(lum[:, None], scale_factor=scale, mode="bilinear",
                            antialias=True, align_corners=False)[:, 0]
    sat = (lum >= s.saturation).float()
    if sat.any():
        sat = F.max_pool2d(sat[:, None], s.kernel_size, 1, s.kernel_size // 2)[:, 0]
    crops, masks = [], []
    for i in range(b):
        r0, c0 = _window(lum[i], s.crop, sat[i])
        crops.append(lum[i, r0:r0 + s.crop, c0:c0 + s.crop])
        masks.append(sat[i, r0:r0 + s.crop, c0:c0 + s.crop])
    return torch.stack(crops), torch.stack(masks), scale


def _border_mask(y: torch.Tensor, size: int) -> torch.Tensor:
    """1 inside, 0 within ``size`` px of the window's edge: the FFTs treat the window as
    periodic, so the wrap-around seam is a false edge that must not vote for the kernel."""
    m = torch.zeros_like(y)
    h, w = y.shape[-2:]
    b = min(size, h // 3, w // 3)
    m[:, b:h - b, b:w - b] = 1.0
    return m


def _main_component(k: torch.Tensor) -> torch.Tensor:
    """Keep the 8-connected support of the kernel's peak (isolated specks are noise)."""
    support = (k > 0).float()[:, None]
    flat = k.flatten(1).argmax(dim=1)
    comp = torch.zeros_like(support).flatten(1)
    comp[torch.arange(k.shape[0]), flat] = 1.0
    comp = comp.view_as(support)
    for _ in range(k.shape[-1]):
        grown = F.max_pool2d(comp, 3, 1, 1) * support
        if torch.equal(grown, comp):
            break
        comp = grown
    return normalise_kernel(k * comp[:, 0], floor=0.0)


def estimate_kernels(y: torch.Tensor, s: DeblurSettings,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Blind kernel estimate, coarse to fine, for (B, H, W) blurred luma windows."""
    b = y.shape[0]
    sizes = _levels(s.kernel_size)
    k = torch.zeros(b, 3, 3, device=y.device, dtype=y.dtype)
    k[:, 1, 1] = 1.0
    for level, size in enumerate(sizes):
        f = size / s.kernel_size
        yl = y if f == 1 else F.interpolate(y[:, None], scale_factor=f, mode="bilinear",
                                            antialias=True, align_corners=False)[:, 0]
        vote = _border_mask(yl, size)
        if mask is not None:
            vote = vote * (1 - (mask if f == 1 else F.interpolate(
                mask[:, None], size=yl.shape[-2:], mode="nearest")[:, 0]))
        yp = yl
        k = resize_kernel(k, size)
        lam = max(s.lam * s.lam_level_decay ** level, 1e-4)  # Pan et al.'s schedule
        for _ in range(s.iterations):
            x = l0_latent(yp, psf2otf(k, yp.shape[-2:]), lam)
            k = estimate_kernel_step(x, yp, size, s.gamma, vote, keep_top=s.keep_top,
                                     floor=s.kernel_floor)
            lam = max(lam * s.lam_decay, 1e-4)
    return k


# --------------------------------------------------------------------------- deconvolution


def taper_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pad (B, C, H, W) by ``p`` px so the frame is smooth across the FFT's wrap-around: a
    reflection fading (raised cosine) into the frame's mean colour. A plain reflection leaves
    a jump at the wrap that the inverse filter amplifies into ringing over the whole frame."""
    if p <= 0:
        return x
    h, w = x.shape[-2:]
    out = F.pad(x, (p, p, p, p), mode="reflect")
    mean = x.mean(dim=(2, 3), keepdim=True)
    t = torch.arange(h + 2 * p, device=x.device, dtype=x.dtype)
    u = torch.arange(w + 2 * p, device=x.device, dtype=x.dtype)

    def ramp(i: torch.Tensor, n: int) -> torch.Tensor:  # 1 inside, 0 at the outer edge
        d = torch.minimum(i - p, (n - 1 + p) - i).clamp(max=0)  # <= 0 in the pad
        return 0.5 * (1 + torch.cos(math.pi * d / p))

    wgt = ramp(t, h)[:, None] * ramp(u, w)[None, :]
    return mean + (out - mean) * wgt


def deconvolve(images: torch.Tensor, kernels: torch.Tensor, mu: torch.Tensor,
               steps: int = 0) -> torch.Tensor:
    """Non-blind deconvolution of (B, C, H, W) by (B, k, k) full-resolution kernels, the
    frame padded by reflection (edge tapering). ``steps = 0``: one Wiener-like solve with a
    quadratic gradient prior of weight ``mu`` (B,); ``steps > 0``: total variation (an L1
    gradient prior of weight ``mu``) by that many half-quadratic splitting steps, beta
    doubling from ``8 mu`` (sharper edges, less ringing than the quadratic prior)."""
    h, w = images.shape[-2:]
    p = min(2 * kernels.shape[-1], h - 1, w - 1)
    x = taper_pad(images, p)
    shape = x.shape[-2:]
    otf = psf2otf(kernels, shape)[:, None]
    fdx, fdy = _diff_otfs(shape, images.device, images.dtype)
    den_d = fdx.abs().square() + fdy.abs().square()
    num0 = otf.conj() * torch.fft.rfft2(x)
    den_k = otf.abs().square()
    m = mu[:, None, None, None]
    out = torch.fft.irfft2(num0 / (den_k + m * den_d), s=shape)
    beta = 8 * m
    for _ in range(steps):
        gx, gy = _grad(out)
        t = m / beta
        zx = torch.sign(gx) * (gx.abs() - t).clamp_min(0)
        zy = torch.sign(gy) * (gy.abs() - t).clamp_min(0)
        num = num0 + beta * torch.fft.rfft2(_grad_t(zx, zy))
        out = torch.fft.irfft2(num / (den_k + beta * den_d), s=shape)
        beta = beta * 2
    return out[..., p:p + h, p:p + w]


def full_resolution_kernel(k: torch.Tensor, scale: float) -> torch.Tensor:
    """An estimation-scale kernel resampled to full resolution (size / scale, odd)."""
    if scale >= 1:
        return k
    size = int(math.ceil(k.shape[-1] / scale)) | 1
    return resize_kernel(k, size)


# --------------------------------------------------------------------------- the gate


def _sharpness(x: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude of the luma over its mean (brightness-normalised), (B,)."""
    lum = x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2]
    gx, gy = _grad(lum)
    g = (gx[:, :-1, :-1].square() + gy[:, :-1, :-1].square()).sqrt()
    return g.mean(dim=(1, 2)) / lum.mean(dim=(1, 2)).clamp_min(1e-3)


def _ringing(src: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Change in flat regions of ``src`` (where ringing shows), in units of its noise
    sigma plus 0.01: the RMS of out - src over pixels whose smoothed gradient is low."""
    lum_s = src.mean(dim=1, keepdim=True)
    smooth = gaussian_blur(lum_s, 2.0)
    gx, gy = _grad(smooth)
    mag = (gx.square() + gy.square()).sqrt()[:, 0]
    thr = torch.quantile(mag.flatten(1)[:, ::7], 0.4, dim=1)[:, None, None]
    flat = (mag <= thr).float()
    diff = (out - src).mean(dim=1).square()
    rms = ((diff * flat).sum(dim=(1, 2)) / flat.sum(dim=(1, 2)).clamp_min(1)).sqrt()
    return rms / (sigma + 0.01)


def _clipped(x: torch.Tensor) -> torch.Tensor:
    return ((x <= 0) | (x >= 1)).float().mean(dim=(1, 2, 3))


def gate(x: torch.Tensor, out: torch.Tensor, length: torch.Tensor, sigma: torch.Tensor, *,
         min_length: float, min_gain: float, max_ringing: float) -> list[str]:
    """The do-no-harm decision per image (``DECISIONS``) for a restoration ``out`` of ``x``
    (``out`` not yet clipped): ``no-blur`` when the kernel is shorter than ``min_length``
    (a NaN length, no kernel estimated, passes), ``no-gain`` when the brightness-normalised
    sharpness rises by less than ``min_gain``, ``ringing`` when flat regions change by more
    than ``max_ringing`` noise sigmas or more pixels clip, else ``applied``."""
    gain = _sharpness(out) / _sharpness(x).clamp_min(1e-6)
    ring = _ringing(x, out, sigma)
    clip_more = _clipped(out) > _clipped(x) + 0.002
    decisions = []
    for i in range(x.shape[0]):
        if float(length[i]) < min_length:
            decisions.append("no-blur")
        elif float(gain[i]) < min_gain:
            decisions.append("no-gain")
        elif float(ring[i]) > max_ringing or bool(clip_more[i]):
            decisions.append("ringing")
        else:
            decisions.append("applied")
    return decisions


class BlindDeblur:
    """The stage: ``__call__(images)`` -> :class:`DeblurResult` (see the module docstring)."""

    def __init__(self, settings: DeblurSettings | None = None, **options: Any) -> None:
        self.settings = settings or DeblurSettings(**options)

    def tag(self) -> str:
        return self.settings.tag()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> DeblurResult:
        s = self.settings
        with torch.autocast(images.device.type, enabled=False):
            x = images.float()
            y, mask, scale = estimation_copy(x, s)
            k = estimate_kernels(y, s, mask if mask.any() else None)
            length = kernel_length(k) / scale
            kf = full_resolution_kernel(k, scale)
            sigma = noise_sigma(x).mean(dim=1)
            out = deconvolve(x, kf, s.mu + s.mu_noise * sigma.square(), s.tv_steps)
            decisions = gate(x, out, length, sigma, min_length=s.min_length,
                             min_gain=s.min_gain, max_ringing=s.max_ringing)
            out = out.clamp(0, 1)
        keep = torch.tensor([d == "applied" for d in decisions], device=x.device)
        result = torch.where(keep[:, None, None, None], out, x).to(images.dtype)
        return DeblurResult(result, decisions, length, k,
                            torch.full((x.shape[0],), scale, device=x.device))
