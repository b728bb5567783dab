"""VARSR's last-scale diffusion refiner (the MAR-style ``diffloss``), checkpoint-compatible.

The module tree mirrors the ``diffloss.*`` tensors of the released transformer checkpoint
(qyp2000/VARSR, ``models/diffusion/diffloss.py``, itself adapted from MAR), so a parent that
holds this module as ``diffloss`` loads the authors' weights with ``strict=True``.

What it does: for each last-scale token the transformer gives a condition row (width 1536);
the refiner samples the continuous residual (32 channels) that the last code misses. It is
a 6-block AdaLN MLP trained as an IDDPM: 1000 cosine steps, epsilon prediction with learned
sigma ("learned range": the second half of the output interpolates the log-variance between
the clipped posterior variance and beta), loss = MSE on eps + VLB on the variance (the mean
detached). Sampling respaces the chain to ``num_sampling_steps`` (10 in VARSR) and clips
the x0 prediction to [-1, 1]; targets are divided by ``vae_scale`` (0.6) before diffusion.

Port hazards fixed here: the authors' sampler hard-codes ``.cuda()`` and draws its noise from
the global RNG; here every tensor follows ``cond``'s device and the caller may supply all the
noise (or a generator), so a sample is reproducible across devices. With no noise and no
generator the global RNG is consumed in the authors' order, so a seeded run matches theirs.
The schedules are float64 numpy (as in the authors' code); each step's coefficients are cast
to float32 on the CPU before they move, so float64-less devices work too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NoiseSource = Tensor | Callable[[int], Tensor]
"""Sampler noise: a ``(steps + 1, N, C)`` tensor or ``k -> (N, C)``; row 0 is x_T."""


# --------------------------------------------------------------------------- schedules


def cosine_alpha_bar(t: float) -> float:
    """The cosine schedule's cumulative signal level at continuous time t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise ``cosine_alpha_bar`` (Nichol & Dhariwal), capped at max_beta.

    beta_i = 1 - abar((i+1)/T) / abar(i/T); only the last step hits the cap at T = 1000.
    """
    betas = [
        min(1.0 - cosine_alpha_bar((i + 1) / num_steps) / cosine_alpha_bar(i / num_steps),
            max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The timesteps kept when respacing, as IDDPM's ``space_timesteps`` (sorted).

    The chain is cut into ``len(section_counts)`` near-equal sections, and each section is
    strided (fractional stride, Python ``round``) to its count, first and last step included.
    "10" over 1000 steps keeps 0, 111, ..., 999. "ddimN" asks for an integer stride.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot take exactly {wanted} of {num_steps} steps by a stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.add(start + round(pos))
            pos += stride
        start += size
    return sorted(kept)


def respaced_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the sub-chain through ``kept`` that keeps alphas_cumprod at those steps.

    beta'_j = 1 - abar[kept[j]] / abar[kept[j-1]] (abar before the first kept step is 1).
    """
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    new, last = [], 1.0
    for i in sorted(kept):
        new.append(1.0 - abar[i] / last)
        last = abar[i]
    return np.asarray(new, dtype=np.float64)


@dataclass(frozen=True)
class DiffusionSchedule:
    """The float64 tables of a (possibly respaced) Gaussian diffusion, IDDPM's definitions.

    ``timestep_map[j]`` is the original timestep that sub-chain step j stands for: the network
    is always given original timesteps (VARSR does not rescale them).
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def build(cls, betas: np.ndarray, timestep_map: Sequence[int] | None = None
              ) -> DiffusionSchedule:
        """Derive every table from the betas; the log posterior variance at step 0 (zero) is
        replaced by that of step 1, as IDDPM does, so it stays finite."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must be 1-D and in (0, 1]")
        tmap = np.arange(len(b)) if timestep_map is None else np.asarray(timestep_map)
        abar = np.cumprod(1.0 - b)
        prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - prev) / (1.0 - abar)
        post_log = (np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1
                    else np.array([], dtype=np.float64))
        return cls(
            betas=b, timestep_map=tmap.astype(np.int64), alphas_cumprod=abar,
            alphas_cumprod_prev=prev, sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=post_var, posterior_log_variance_clipped=post_log,
            posterior_mean_coef1=b * np.sqrt(prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - abar),
            log_betas=np.log(b),
        )

    @classmethod
    def cosine(cls, num_steps: int = 1000, respacing: int | str | Sequence[int] | None = None
               ) -> DiffusionSchedule:
        """The cosine chain, respaced to ``respacing`` (``None``/"" keeps all steps).

        The full chain also goes through ``respaced_betas``, as the authors' training
        diffusion does, so its betas are bit-identical to theirs (not merely to 1e-16).
        """
        betas = cosine_betas(num_steps)
        if respacing is None or respacing == "":
            respacing = [num_steps]
        kept = space_timesteps(num_steps, respacing)
        return cls.build(respaced_betas(betas, kept), kept)

    def original_t(self, t: Tensor) -> Tensor:
        """The original timesteps that sub-chain steps ``t`` stand for (what the net sees)."""
        return torch.from_numpy(self.timestep_map)[t.cpu()].to(t.device)

    def take(self, name: str, t: Tensor) -> Tensor:
        """Table ``name`` at integer steps ``t``, as a float32 ``(N, 1)`` on t's device."""
        table = torch.from_numpy(getattr(self, name)).to(torch.float32)
        return table[t.cpu()].to(t.device).unsqueeze(-1)


# --------------------------------------------------------------------------- network


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (GLIDE/DiT): ``[cos(t f), sin(t f)]``, f = max_period^(-k/half).

    Cosines come first; an odd ``dim`` is padded with one zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _TimestepEmbedder(nn.Module):
    """Sinusoid (``freq_dim``) -> Linear -> SiLU -> Linear (names ``mlp.0``, ``mlp.2``)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class _ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); the AdaLN chunks are (shift, scale, gate)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class _FinalLayer(nn.Module):
    """Affine-free LN, AdaLN (shift, scale), then a linear to the output channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: the denoiser eps_theta(x_t, t, c) -> (eps, variance values).

    The AdaLN signal is time_embed(t) + cond_embed(c); the input is projected to ``width``.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_channels: int,
                 depth: int, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpoint = grad_checkpoint
        self.time_embed = _TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_layer = _FinalLayer(width, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: Xavier linears, zero biases, N(0, 0.02) time MLP, and zero AdaLN
        and output layers, so a fresh refiner predicts eps = 0 and the mid log-variance."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zeroed:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _body(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """x (N, C), original timesteps t (N,), condition c (N, D) -> (N, out_channels).

        x and c are cast to the weights' dtype (a no-op for float32 weights, also under
        autocast), so a half or double copy of the refiner takes the float32 chain state.
        """
        dtype = self.input_proj.weight.dtype
        x, c = x.to(dtype), c.to(dtype)
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._body, x, t, c, use_reentrant=False)
        return self._body(x, t, c)


# --------------------------------------------------------------------------- the refiner


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) of a Gaussian binned at 1/255 (tanh CDF approximation), as IDDPM's t = 0
    decoder term; kept for checkpoint-faithful training although latents are not 8-bit."""

    def cdf(v: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    logp = torch.where(x < -0.999, log_plus,
                       torch.where(x > 0.999, log_one_minus_min, log_delta))
    return -logp


def _randn(shape: tuple[int, ...], generator: torch.Generator | None,
           device: torch.device) -> Tensor:
    """Standard normal noise on ``device``, drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class DiffusionRefiner(nn.Module):
    """VARSR's ``DiffLoss``: per-token diffusion head over the last scale's residual.

    Attribute ``net`` holds the denoiser so the state dict reads ``net.*`` as in the released
    checkpoint. Defaults are the released sizes: 32 token channels, condition 1536, width
    1024, depth 6, 1000 cosine training steps respaced to "10" for sampling.
    """

    def __init__(self, token_channels: int = 32, cond_channels: int = 1536, width: int = 1024,
                 depth: int = 6, num_sampling_steps: int | str | Sequence[int] = "10",
                 num_train_steps: int = 1000, vae_scale: float = 0.6,
                 grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.token_channels = token_channels
        self.vae_scale = vae_scale
        self.net = AdaLNMLP(token_channels, width, 2 * token_channels, cond_channels, depth,
                            grad_checkpoint=grad_checkpoint)
        self.train_schedule = DiffusionSchedule.cosine(num_train_steps)
        self.gen_schedule = DiffusionSchedule.cosine(num_train_steps, num_sampling_steps)

    # ---- training

    def loss_terms(self, target: Tensor, cond: Tensor, t: Tensor | None = None,
                   noise: Tensor | None = None, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
        """Per-row (eps MSE, VLB in bits) at timesteps ``t`` (drawn uniformly when None).

        The VLB sees the eps prediction detached, so it only trains the variance output, and
        it is the discretised decoder NLL at t = 0, the posterior KL elsewhere.
        """
        sch, dev = self.train_schedule, cond.device
        x0 = target.float() / self.vae_scale
        n, ch = x0.shape
        if t is None:
            if generator is None:
                t = torch.randint(0, sch.num_timesteps, (n,), device=dev)
            else:
                t = torch.randint(0, sch.num_timesteps, (n,), generator=generator,
                                  device=generator.device).to(dev)
        t = t.to(dev)
        noise = _randn(tuple(x0.shape), generator, dev) if noise is None else noise.to(x0)
        x_t = sch.take("sqrt_alphas_cumprod", t) * x0 \
            + sch.take("sqrt_one_minus_alphas_cumprod", t) * noise
        out = self.net(x_t, sch.original_t(t), cond).float()
        eps, var_values = out[:, :ch], out[:, ch:]
        mse = ((noise - eps) ** 2).mean(dim=1)
        mean, log_var, _ = self._p_mean_logvar(sch, eps.detach(), var_values, x_t, t, False)
        true_mean = sch.take("posterior_mean_coef1", t) * x0 \
            + sch.take("posterior_mean_coef2", t) * x_t
        true_log_var = sch.take("posterior_log_variance_clipped", t)
        kl = _normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / math.log(2.0)
        nll = _discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
        return mse, torch.where(t == 0, nll, kl)

    def loss(self, target: Tensor, cond: Tensor, mask: Tensor | None = None,
             t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss: mean over rows (mask-weighted if given) of MSE + VLB.

        target (N, C) is the continuous residual, unscaled; cond (N, D) its condition row.
        """
        mse, vb = self.loss_terms(target, cond, t=t, noise=noise, generator=generator)
        per_row = mse + vb
        if mask is not None:
            mask = mask.to(per_row)
            return (per_row * mask).sum() / mask.sum()
        return per_row.mean()

    def forward(self, target: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        """``loss`` with random timesteps and noise, as the authors' ``DiffLoss.forward``."""
        return self.loss(target, cond, mask=mask)

    # ---- sampling

    @staticmethod
    def _p_mean_logvar(sch: DiffusionSchedule, eps: Tensor, var_values: Tensor, x: Tensor,
                       t: Tensor, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
        """p(x_{t-1} | x_t): posterior mean at the (optionally [-1, 1]-clipped) x0 prediction,
        and the learned-range log-variance frac*log(beta) + (1-frac)*log(clipped posterior var),
        frac = (v + 1) / 2. Returns (mean, log_variance, x0)."""
        min_log = sch.take("posterior_log_variance_clipped", t)
        max_log = sch.take("log_betas", t)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = sch.take("sqrt_recip_alphas_cumprod", t) * x \
            - sch.take("sqrt_recipm1_alphas_cumprod", t) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = sch.take("posterior_mean_coef1", t) * x0 + sch.take("posterior_mean_coef2", t) * x
        return mean, log_var, x0

    def _noise_fn(self, noise: NoiseSource | None, generator: torch.Generator | None,
                  n: int, guided: bool, device: torch.device) -> Callable[[int], Tensor]:
        """Draw k (0 = x_T, 1..steps = the steps' noise) as a float32 (N, C) on ``device``.

        Internally drawn noise follows the authors' order and shapes: x_T for the N rows,
        then per step 2N rows under CFG (the uncond half unused) and the last step's draw
        that the t = 0 mask discards, so a seeded global RNG reproduces their sampler.
        """
        steps, ch = self.gen_schedule.num_timesteps, self.token_channels
        if noise is None:
            def draw(k: int) -> Tensor:
                rows = 2 * n if guided and k > 0 else n
                return _randn((rows, ch), generator, device)[:n]
            return draw
        if callable(noise) and not isinstance(noise, Tensor):
            return lambda k: noise(k).to(device=device, dtype=torch.float32)
        if tuple(noise.shape) != (steps + 1, n, ch):
            raise ValueError(f"noise must be ({steps + 1}, {n}, {ch}), got {tuple(noise.shape)}")
        table = noise.to(device=device, dtype=torch.float32)
        return lambda k: table[k]

    def _denoiser_out(self, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None,
                      cfg: float) -> tuple[Tensor, Tensor]:
        """(eps, variance values) at x; under CFG eps = (1 + cfg) eps_c - cfg eps_u, with the
        variance from the conditional branch (the authors' ``forward_with_cfg``)."""
        ch = self.token_channels
        tm = self.gen_schedule.original_t(t)
        if uncond is None:
            out = self.net(x, tm, cond).float()
            return out[:, :ch], out[:, ch:]
        n = x.shape[0]
        out = self.net(torch.cat([x, x]), torch.cat([tm, tm]), torch.cat([cond, uncond])).float()
        eps_c, eps_u = out[:n, :ch], out[n:, :ch]
        return eps_c * (1 + cfg) - cfg * eps_u, out[:n, ch:]

    @torch.no_grad()
    def sample(self, cond: Tensor, temperature: float = 1.0, cfg: float = 1.0,
               noise: NoiseSource | None = None, generator: torch.Generator | None = None,
               uncond: Tensor | None = None, clip_denoised: bool = True) -> Tensor:
        """Ancestral IDDPM sampling over the respaced chain -> residual (N, C), scaled back.

        cond (N, D): one condition row per token. CFG follows the authors: ``cfg == 1`` is
        the plain conditional sampler (``uncond`` ignored); any other value needs ``uncond``
        (N, D) and guides eps by (1 + cfg) eps_c - cfg eps_u, so cfg = 0 is conditional too.
        Their call ``sample(cat([c, u]), cfg=s)`` is ``sample(c, cfg=s, uncond=u)`` here (their
        first half). ``temperature`` scales the step noise only. ``noise``: see ``NoiseSource``.
        """
        guided = cfg != 1.0
        if guided and uncond is None:
            raise ValueError("cfg != 1 needs the unconditional rows `uncond`")
        if not guided:
            uncond = None
        sch, dev, n = self.gen_schedule, cond.device, cond.shape[0]
        draw = self._noise_fn(noise, generator, n, guided, dev)
        x = draw(0)
        for k, i in enumerate(range(sch.num_timesteps - 1, -1, -1), start=1):
            t = torch.full((n,), i, dtype=torch.long, device=dev)
            eps, var_values = self._denoiser_out(x, t, cond, uncond, cfg)
            mean, log_var, _ = self._p_mean_logvar(sch, eps, var_values, x, t, clip_denoised)
            step_noise = draw(k)
            x = mean + torch.exp(0.5 * log_var) * step_noise * temperature if i > 0 else mean
        return x * self.vae_scale
