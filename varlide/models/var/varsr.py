"""VARSR assembled: the transformer with its refiner, checkpoint loading, and inference.

:class:`VARSRModel` holds the state dict of the authors' ``var_wo_ddp`` flat (the
transformer's names at top level, the refiner under ``diffloss.*``), so the released
checkpoint loads with ``strict=True``. :func:`restore` mirrors the authors' test path
(qyp2000/VARSR ``models/var.py`` ``VAR_RoPE.autoregressive_infer_cfg`` and ``test_varsr.py``):
a doubled CFG batch sharing the LR prefix (label 0 / label ``num_classes - 1``), per-scale
guidance t = cfg * si / (SN - 1), their top-k/top-p sampler, the refiner guided by the last
scale's t, decoding and the AdaIN colour fix against the LR image.

Port hazards fixed: no ``.cuda()``; a seeded run builds its generator on the input's device
(the authors build theirs on the default device) and the same generator also drives the
refiner (theirs draws from the global RNG), so a seed fixes the whole output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from varlide.models.var.refiner import DiffusionRefiner, NoiseSource
from varlide.models.var.rope import RotaryEmbedding
from varlide.models.var.transformer import (
    RELEASED_COND_CHANNELS,
    RELEASED_PATCH_NUMS,
    VARTransformer,
)
from varlide.models.var.vqvae import MultiScaleVQVAE

CHECKPOINT_KEYS: dict[str, str] = {"transformer": "var_wo_ddp", "vae": "vae_local"}
"""Where the authors' ``trainer`` dict keeps each model's weights."""


class VARSRModel(VARTransformer):
    """``VAR_RoPE`` with its ``diffloss`` refiner; every size an argument, defaults = release.

    Subclassing (not composition) keeps the state dict flat as in ``var_wo_ddp``: 345
    transformer tensors plus 60 ``diffloss.*`` ones at the released sizes.
    """

    def __init__(self, depth: int = 24, width: int = 1536, heads: int = 24,
                 mlp_ratio: float = 4.0, vocab_size: int = 4096, cvae: int = 32,
                 patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS, num_classes: int = 2,
                 cond_channels: tuple[int, ...] = RELEASED_COND_CHANNELS,
                 prefix_side: int = 32, norm_eps: float = 1e-6, drop_path_rate: float = 0.1,
                 rope: RotaryEmbedding | None = None, refiner_width: int = 1024,
                 refiner_depth: int = 6, refiner_steps: int | str = "10",
                 vae_scale: float = 0.6) -> None:
        super().__init__(depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio,
                         vocab_size=vocab_size, cvae=cvae, patch_nums=patch_nums,
                         num_classes=num_classes, cond_channels=cond_channels,
                         prefix_side=prefix_side, norm_eps=norm_eps,
                         drop_path_rate=drop_path_rate, rope=rope)
        self.diffloss = DiffusionRefiner(token_channels=cvae, cond_channels=width,
                                         width=refiner_width, depth=refiner_depth,
                                         num_sampling_steps=refiner_steps, vae_scale=vae_scale)


# --------------------------------------------------------------------------- checkpoints


def _default_key(model: nn.Module) -> str:
    if isinstance(model, MultiScaleVQVAE):
        return CHECKPOINT_KEYS["vae"]
    return CHECKPOINT_KEYS["transformer"]


def load_authors_checkpoint(model: nn.Module, path: str | Path, key: str | None = None):
    """Load weights strictly from the authors' ``{'trainer': {key: sd}}`` nesting, a plain
    state dict file, or a ``.safetensors`` file; returns ``load_state_dict``'s result.

    ``torch.load`` runs with ``weights_only=True`` (never a full unpickle) and ``mmap=True``,
    so the optimizer state in the released 13.7 GB file is not read into memory.
    ``key`` defaults to ``vae_local`` for a VQ-VAE and ``var_wo_ddp`` otherwise.
    """
    from varlide.models.var.checkpoints import read_authors_state  # the one reader

    _, state = read_authors_state(path, _default_key(model) if key is None else key)
    return model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- sampling


def sample_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """(B, l, V) logits -> (B, l) indices, the authors' ``sample_with_top_k_top_p_``.

    Keep logits >= the k-th largest (top_k > 0), then drop the ascending-sorted tail whose
    cumulative probability is <= 1 - top_p (the largest always kept), then one multinomial
    draw per row with replacement. Works on an fp32 copy; top_k = 1 is greedy (up to exact
    ties) but still consumes the generator, as theirs does. The draw happens on the
    generator's device.
    """
    b, n, v = logits.shape
    logits = logits.float().clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, v), dim=-1, largest=True, sorted=False)[0].amin(
            dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(sorted_idx.ndim - 1, sorted_idx, drop), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, v)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    idx = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
    return idx.to(logits.device).view(b, n)


def _generator(seed: int | torch.Generator | None, device: torch.device
               ) -> torch.Generator | None:
    """A generator on ``device`` for an integer seed; a given generator is used as is."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(int(seed))


def _amp(device: torch.device, amp_dtype: torch.dtype | str | None
         ) -> contextlib.AbstractContextManager:
    """Autocast for the networks: "auto" = bf16 on CUDA, fp32 elsewhere; None = fp32."""
    if amp_dtype == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    if amp_dtype is None:
        return contextlib.nullcontext()
    if not isinstance(amp_dtype, torch.dtype):
        raise ValueError(f"amp_dtype must be a torch.dtype, 'auto' or None, got {amp_dtype!r}")
    return torch.autocast(device.type, dtype=amp_dtype)


# --------------------------------------------------------------------------- colour fix


def _mean_std(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and sqrt(unbiased var + eps), as their ``calc_mean_std``."""
    flat = x.float().flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adain_colour_fix(content: Tensor, style: Tensor, eps: float = 1e-5,
                     clamp: bool = True) -> Tensor:
    """The authors' ``adain_color_fix`` on tensors: give ``content`` (B, 3, H, W) in [0, 1]
    the per-channel mean and std of ``style`` (the LR image at the output size).

    Theirs runs on 8-bit PIL images (the output rounded to uint8 first); this one stays in
    float. Statistics are size-independent, so ``style`` may have any spatial size.
    """
    c_mean, c_std = _mean_std(content, eps)
    s_mean, s_std = _mean_std(style, eps)
    out = (content.float() - c_mean) / c_std * s_std + s_mean
    return out.clamp(0.0, 1.0) if clamp else out


# --------------------------------------------------------------------------- inference


@dataclass
class _Tokens:
    """What the scale loop leaves: indices per scale, f_hat (fp32), the last scale's doubled
    hidden states (2B, pn^2, C) and its guidance t."""

    indices: list[Tensor]
    f_hat: Tensor
    last_hidden: Tensor
    last_t: float


def _check_pair(model: VARSRModel, vae: MultiScaleVQVAE, lr: Tensor) -> None:
    if tuple(model.patch_nums) != tuple(vae.patch_nums) or model.cvae != vae.Cvae \
            or model.vocab_size != vae.vocab_size:
        raise ValueError("transformer and VQ-VAE disagree on patch_nums, Cvae or vocab")
    side = vae.image_size
    if lr.dim() != 4 or lr.shape[1] != 3 or lr.shape[-2:] != (side, side) \
            or model.image_side != side:
        raise ValueError(f"expected LR images (B, 3, {side}, {side}) for a model taking "
                         f"{model.image_side}^2, got {tuple(lr.shape)}")


def _generate_tokens(model: VARSRModel, vae: MultiScaleVQVAE, lr_pm1: Tensor, label: int,
                     cfg: float, top_k: int, top_p: float,
                     rng: torch.Generator | None) -> _Tokens:
    """The scale loop of ``autoregressive_infer_cfg`` on the KV-cached transformer."""
    b, quant = lr_pm1.shape[0], vae.quantize
    labels = torch.cat((torch.full((b,), label, dtype=torch.long, device=lr_pm1.device),
                        torch.full((b,), model.num_classes - 1, dtype=torch.long,
                                   device=lr_pm1.device)))
    side, sn = model.patch_nums[-1], len(model.patch_nums)
    f_hat = torch.zeros(b, model.cvae, side, side, device=lr_pm1.device)
    indices: list[Tensor] = []
    t = 0.0
    out = model.prefill(lr_pm1, labels)  # the same LR prefix for both halves
    for si in range(sn):
        if si > 0:
            x = quant.next_scale_input(f_hat, si - 1).float()
            out = model.step(si, torch.cat((x, x)))
        logits = out.logits.float()
        t = cfg * si / (sn - 1)
        if si == sn - 1:  # their discarded ``idx_Bl_last`` draw: keeps the RNG stream alike
            sample_top_k_top_p(logits, top_k, top_p, rng)
        guided = (1 + t) * logits[:b] - t * logits[b:]
        idx = sample_top_k_top_p(guided, top_k, top_p, rng)
        indices.append(idx)
        f_hat = f_hat + quant.scale_contribution(idx, si).float()
    return _Tokens(indices, f_hat, out.hidden, t)


def _refinement(model: VARSRModel, vae: MultiScaleVQVAE, tokens: _Tokens,
                noise: NoiseSource | None, rng: torch.Generator | None) -> Tensor:
    """The refiner's last-scale residual (B, pn^2, Cvae), guided by the last scale's t.

    Condition rows: decoder_norm(hidden + word_embed(E[last idx])) for both halves (the
    conditional half's indices for both, as the authors do); noise rows run image-major.
    """
    idx = tokens.indices[-1]
    b, n = idx.shape
    code = vae.quantize.embedding(idx)
    z = model.refiner_condition(tokens.last_hidden, torch.cat((code, code)))
    z = z.reshape(2 * b * n, -1)
    res = model.diffloss.sample(z[: b * n], temperature=1.0, cfg=tokens.last_t, noise=noise,
                                generator=rng, uncond=z[b * n:])
    return res.float().view(b, n, -1)


@torch.no_grad()
def restore(model: VARSRModel, vae: MultiScaleVQVAE, lr_image_01: Tensor, cfg: float = 6.0,
            top_k: int = 1, top_p: float = 0.75, seed: int | torch.Generator | None = None,
            refine: bool = True, return_indices: bool = False, colour_fix: bool = True,
            noise: NoiseSource | None = None, amp_dtype: torch.dtype | str | None = "auto",
            label: int = 0) -> Tensor | tuple[Tensor, list[Tensor]]:
    """LR images (B, 3, S, S) in [0, 1] -> restored images (B, 3, S, S) in [0, 1].

    Defaults are the authors' test settings (cfg 6, greedy top_k = 1, top_p 0.75, label 0 =
    high quality). ``seed``: an int (a generator on the input's device), a generator, or
    None (the global RNG of each device). ``noise``: the refiner's noise, see
    :class:`~varlide.models.var.refiner.DiffusionRefiner` (rows image-major, B * pn^2).
    ``refine=False`` decodes the tokens alone. With ``return_indices`` also the per-scale
    (B, pn^2) indices. Networks run under ``amp_dtype`` autocast; sampling, guidance and
    f_hat stay fp32.
    """
    _check_pair(model, vae, lr_image_01)
    device = lr_image_01.device
    rng = _generator(seed, device)
    lr_pm1 = lr_image_01.float() * 2 - 1
    try:
        with _amp(device, amp_dtype):
            tokens = _generate_tokens(model, vae, lr_pm1, label, cfg, top_k, top_p, rng)
            f_hat = tokens.f_hat
            if refine:
                res = _refinement(model, vae, tokens, noise, rng)
                f_hat = f_hat + res.transpose(1, 2).reshape(f_hat.shape)
            image = vae.fhat_to_img01(f_hat).float()
    finally:
        model.reset_cache()
    if colour_fix:
        image = adain_colour_fix(image, lr_image_01)
    return (image, tokens.indices) if return_indices else image


def _guided_logits(logits: Tensor, patch_nums: tuple[int, ...], cfg: float) -> Tensor:
    """(2B, L, V) teacher-forced [cond; uncond] logits -> (B, L, V) guided, scale si with
    t = cfg * si / (SN - 1) as the cached scale loop."""
    b, sn = logits.shape[0] // 2, len(patch_nums)
    t = torch.cat([torch.full((pn * pn,), cfg * si / (sn - 1), device=logits.device)
                   for si, pn in enumerate(patch_nums)]).view(1, -1, 1)
    return (1 + t) * logits[:b] - t * logits[b:]


def restore_straight_through(model: VARSRModel, vae: MultiScaleVQVAE, lr_image_01: Tensor,
                             cfg: float = 6.0, temperature: float = 1.0,
                             colour_fix: bool = True, label: int = 0) -> Tensor:
    """A differentiable stand-in for greedy :func:`restore` without the refiner: what
    fine-tuning the modules around a frozen backbone back-propagates through.

    1. The greedy tokens of cached inference, without gradients: exactly what ``restore(...,
       top_k=1, refine=False)`` decodes, so the forward value is the inference output.
    2. One teacher-forced pass (block-causal mask, doubled CFG batch) on those tokens' own
       next-scale inputs, with gradients; per-scale guided logits as the scale loop's.
    3. Straight-through codes: forward the chosen code vectors, backward through
       ``softmax(guided / temperature) @ codebook`` (token sampling has no gradient).
    4. f_hat from the codes, decoded; the AdaIN colour fix against the LR image.

    Gradients reach the LR image (the ControlNet prefix and the colour fix's statistics)
    and every parameter on the transformer's path (SF-RoPE's included); the cut is between
    scales (a scale's input is the chosen tokens', as in VAR's teacher forcing). Runs under
    the caller's autocast.
    """
    _check_pair(model, vae, lr_image_01)
    lr_pm1 = lr_image_01.float() * 2 - 1
    b, dev = lr_pm1.shape[0], lr_pm1.device
    try:
        with torch.no_grad():
            tokens = _generate_tokens(model, vae, lr_pm1.detach(), label, cfg, 1, 0.0, None)
    finally:
        model.reset_cache()
    quant = vae.quantize
    inputs = quant.teacher_forcing_inputs(tokens.indices).float()
    labels = torch.cat((torch.full((b,), label, dtype=torch.long, device=dev),
                        torch.full((b,), model.num_classes - 1, dtype=torch.long, device=dev)))
    out = model.forward_teacher_forcing(lr_pm1, labels, torch.cat((inputs, inputs)))
    guided = _guided_logits(out.logits.float(), model.patch_nums, cfg)
    book = quant.embedding.weight.float()
    soft = guided.div(temperature).softmax(dim=-1) @ book  # (B, L, Cvae)
    codes = book[torch.cat(tokens.indices, dim=1)] + (soft - soft.detach())
    f_hat, start = None, 0
    for si, pn in enumerate(model.patch_nums):
        part = quant.contribution_of_codes(codes[:, start:start + pn * pn], si)
        f_hat = part if f_hat is None else f_hat + part
        start += pn * pn
    image = vae.fhat_to_img01(f_hat).float()
    return adain_colour_fix(image, lr_image_01) if colour_fix else image


class VARSRPipeline:
    """A transformer + VQ-VAE pair with default sampling settings; call it on LR batches."""

    def __init__(self, model: VARSRModel, vae: MultiScaleVQVAE, **defaults) -> None:
        self.model, self.vae = model.eval(), vae.eval()
        self.defaults = defaults

    @classmethod
    def from_checkpoints(cls, var_path: str | Path, vae_path: str | Path,
                         device: str | torch.device = "cpu", **defaults) -> VARSRPipeline:
        """Released sizes, weights from the authors' files (see load_authors_checkpoint).

        Built directly on ``device`` (not on meta: SA-RoPE's table is a plain attribute that
        a meta build would leave empty).
        """
        with torch.device(device):
            model, vae = VARSRModel(), MultiScaleVQVAE()
        load_authors_checkpoint(model, var_path, CHECKPOINT_KEYS["transformer"])
        load_authors_checkpoint(vae, vae_path, CHECKPOINT_KEYS["vae"])
        return cls(model, vae, **defaults)

    def to(self, device: str | torch.device) -> VARSRPipeline:
        self.model.to(device)
        self.vae.to(device)
        return self

    def __call__(self, lr_image_01: Tensor, **overrides) -> Tensor | tuple[Tensor, list[Tensor]]:
        return restore(self.model, self.vae, lr_image_01, **{**self.defaults, **overrides})

    def batches(self, images: Tensor, batch_size: int, **overrides) -> Iterator[Tensor]:
        """Restore a stack in chunks of ``batch_size`` (the doubled CFG batch is 2x that)."""
        for start in range(0, images.shape[0], batch_size):
            yield self(images[start:start + batch_size], **overrides)


__all__ = ["CHECKPOINT_KEYS", "VARSRModel", "VARSRPipeline", "adain_colour_fix",
           "load_authors_checkpoint", "restore", "restore_straight_through",
           "sample_top_k_top_p"]
