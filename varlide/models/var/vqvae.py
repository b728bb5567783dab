"""VARSR's multi-scale residual VQ-VAE tokenizer, checkpoint-compatible, pure torch.

The module tree mirrors the released ``vae_local`` state dict (qyp2000/VARSR, ``models/
vqvae.py``, ``basic_vae.py``, ``quant.py``), so ``load_state_dict(strict=True)`` takes the
authors' checkpoint as is. Only tokenisation and decoding are implemented: the VQ training
forward (commitment loss, codebook-usage EMA) is not, the tokenizer is frozen in VARSR.

Quantisation, scale by scale (``si`` = 0..SN-1, ``pn`` = side of that scale's token map):
area-downsample the residual to ``pn`` (not at the last scale, where ``pn`` is the feature
size), take the nearest code in plain L2 (no normalisation), bicubic-upsample its embedding
to the feature size, apply phi(h) = (1 - r) h + r conv3x3(h), add it to ``f_hat`` and subtract
it from the residual. **VARSR's change against VAR:** phi is skipped at the last scale, so the
last scale adds the raw code embedding, and the continuous residual entering the last scale
is kept: VARSR's diffusion refiner learns the part of it that the last code misses.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RELEASED_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
"""Token-map sides of the released model: 512x512 images, 16x downsampling, L = 2240."""


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6), the only normalisation of the VAE (as in LDM's vq-f16)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    """Pre-activation residual block; a 1x1 ``nin_shortcut`` only when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class _SelfAttention2d(nn.Module):
    """Single-head spatial self-attention with a residual, softmax scale C^-1/2.

    The authors use two ``bmm``; scaled_dot_product_attention computes the same attention
    without materialising it twice (equal up to float rounding).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hh * ww).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww))


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class _Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block[i]`` then ``attn[i]`` (attention only at the deepest level).

    The owner attaches ``downsample`` / ``upsample`` as an attribute so the state-dict names
    stay the authors' (``down.<i>.downsample.conv``, ``up.<i>.upsample.conv``).
    """

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(
            _ResBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(_SelfAttention2d(out_ch) for _ in range(n_blocks if attn else 0))

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResBlock, self-attention (or identity), ResBlock at the bottleneck width."""

    def __init__(self, channels: int, attn: bool, dropout: float) -> None:
        super().__init__()
        self.block_1 = _ResBlock(channels, channels, dropout)
        self.attn_1 = _SelfAttention2d(channels) if attn else nn.Identity()
        self.block_2 = _ResBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VAEEncoder(nn.Module):
    """Image (B, 3, H, W) -> features (B, z_channels, H/2^(n-1), W/2^(n-1)), n = len(ch_mult)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, in_channels: int = 3, dropout: float = 0.0,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            deepest = i == len(ch_mult) - 1
            level = _Level(width, ch * mult, num_res_blocks, using_sa and deepest, dropout)
            width = ch * mult
            if not deepest:
                level.downsample = _Downsample(width)
            self.down.append(level)
        self.mid = _Mid(width, using_mid_sa, dropout)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """Features -> image; ``num_res_blocks + 1`` blocks per level, ``up[i]`` is level i.

    Levels run from the deepest (``up[-1]``) to the shallowest (``up[0]``), as in LDM.
    """

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 z_channels: int, out_channels: int = 3, dropout: float = 0.0,
                 using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _Mid(width, using_mid_sa, dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            deepest = i == len(ch_mult) - 1
            level = _Level(width, ch * ch_mult[i], num_res_blocks + 1, using_sa and deepest,
                           dropout)
            width = ch * ch_mult[i]
            if i != 0:
                level.upsample = _Upsample(width)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def phi_ticks(count: int) -> list[float]:
    """Positions in [0, 1] of the shared phi convs, bit-equal to the authors' np.linspace.

    ``linspace(1/12, 11/12, 4)`` for 4 convs, ``linspace(1/2K, 1 - 1/2K, K)`` otherwise.
    Bit-equality matters: with 10 scales, si = 2 and si = 7 sit exactly halfway between two
    ticks and float rounding decides (conv 1 and conv 3), as it does in numpy.
    """
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    start, stop = margin, 1 - margin
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    ticks = [i * step + start for i in range(count)]
    ticks[-1] = stop
    return ticks


def phi_index(si: int, num_scales: int, count: int) -> int:
    """Which of ``count`` shared phi convs scale ``si`` uses: the tick nearest si/(SN-1)."""
    at = si / (num_scales - 1)
    ticks = phi_ticks(count)
    return min(range(count), key=lambda k: abs(ticks[k] - at))  # first of ties, as argmin


class _Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual refinement of an upsampled code map."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


class _PhiBank(nn.Module):
    """K partially shared phi convs (``qresi_ls``), picked per scale by ``phi_index``."""

    def __init__(self, channels: int, ratio: float, count: int) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(_Phi(channels, ratio) for _ in range(count))


class MultiScaleTokens(NamedTuple):
    """What encoding produces.

    ``indices``: one LongTensor (B, pn*pn) per scale, row-major over the token map.
    ``f_hat``: (B, Cvae, pn_last, pn_last), the sum of every scale's contribution.
    ``last_residual``: (B, pn_last^2, Cvae), the continuous residual *entering* the last scale
    (VARSR's ``f_rest_wo_last_discrete``); the refiner's target is this minus E[last indices].
    """

    indices: list[Tensor]
    f_hat: Tensor
    last_residual: Tensor


class ResidualQuantizer(nn.Module):
    """Multi-scale residual quantiser (the authors' ``VectorQuantizer2``, inference only).

    ``ema_vocab_hit_SV`` (SN, V) is a training statistic of the authors' code; it is kept as
    a buffer only because the released checkpoint stores it.
    """

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...],
                 quant_resi: float = 0.5, share_quant_resi: int = 4,
                 using_znorm: bool = False) -> None:
        super().__init__()
        if len(patch_nums) < 2:
            raise ValueError(f"need at least two scales, got patch_nums={patch_nums}")
        if share_quant_resi < 2 or abs(quant_resi) <= 1e-6:
            raise ValueError("only partially shared phi convs (share_quant_resi >= 2, "
                             "quant_resi != 0) are implemented, as in the released model")
        self.vocab_size, self.z_channels = vocab_size, z_channels
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.using_znorm = using_znorm
        self.quant_resi = _PhiBank(z_channels, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, z_channels)
        n = len(self.patch_nums)
        self.phi_of_scale = tuple(phi_index(si, n, share_quant_resi) for si in range(n))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def nearest_code(self, z: Tensor) -> Tensor:
        """(N, C) -> (N,) index of the nearest codebook row.

        Plain L2 as |z|^2 + |e|^2 - 2 z.e (the authors' expansion, so ties break alike),
        computed in float32 whatever the model dtype; cosine when ``using_znorm``.
        """
        z, codes = z.float(), self.embedding.weight.float()
        if self.using_znorm:
            return (F.normalize(z, dim=-1) @ F.normalize(codes, dim=-1).T).argmax(dim=1)
        dist = z.square().sum(1, keepdim=True) + codes.square().sum(1)
        return torch.addmm(dist, z, codes.T, beta=1, alpha=-2).argmin(dim=1)

    def scale_contribution(self, idx: Tensor, si: int) -> Tensor:
        """What scale ``si`` adds to f_hat: (B, pn*pn) indices -> (B, C, pn_last, pn_last).

        Bicubic upsampling then phi for every scale but the last; the last adds the raw
        embedding (VARSR; VAR applies phi there too).
        """
        return self.contribution_of_codes(self.embedding(idx), si)

    def contribution_of_codes(self, codes: Tensor, si: int) -> Tensor:
        """:meth:`scale_contribution` from code vectors (B, pn*pn, C) rather than indices:
        soft (probability-weighted) codes make f_hat differentiable (fine-tuning)."""
        pn, side = self.patch_nums[si], self.patch_nums[-1]
        h = codes.reshape(codes.shape[0], pn, pn, self.z_channels)
        h = h.permute(0, 3, 1, 2).contiguous()
        if si == self.num_scales - 1:
            return h
        h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.quant_resi.qresi_ls[self.phi_of_scale[si]](h)

    def quantize(self, f: Tensor) -> MultiScaleTokens:
        """Features (B, C, pn_last, pn_last) -> tokens, f_hat and the last-scale residual."""
        b, c, hh, ww = f.shape
        side = self.patch_nums[-1]
        if (hh, ww) != (side, side):
            raise ValueError(f"features are {hh}x{ww}, the last scale needs {side}x{side}")
        rest = f.detach().clone()
        f_hat = torch.zeros_like(rest)
        indices: list[Tensor] = []
        last_residual = rest
        for si, pn in enumerate(self.patch_nums):
            last = si == self.num_scales - 1
            z = rest if last else F.interpolate(rest, size=(pn, pn), mode="area")
            idx = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            h = self.scale_contribution(idx, si)
            if last:
                last_residual = rest.permute(0, 2, 3, 1).reshape(b, pn * pn, c).clone()
            f_hat = f_hat + h
            rest = rest - h
            indices.append(idx)
        return MultiScaleTokens(indices, f_hat, last_residual)

    def _check_indices(self, indices: list[Tensor], count: int) -> None:
        if len(indices) < count:
            raise ValueError(f"expected {count} scales of indices, got {len(indices)}")
        for si, idx in enumerate(indices[:count]):
            pn = self.patch_nums[si]
            if idx.dim() != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"scale {si}: expected (B, {pn * pn}), got {tuple(idx.shape)}")

    def indices_to_fhat(self, indices: list[Tensor], refinement: Tensor | None = None) -> Tensor:
        """Sum of every scale's contribution; ``refinement`` (B, pn_last^2, C), VARSR's
        refiner output, is added at the last scale as its inference does."""
        self._check_indices(indices, self.num_scales)
        f_hat = self.scale_contribution(indices[0], 0)
        for si in range(1, self.num_scales):
            f_hat = f_hat + self.scale_contribution(indices[si], si)
        if refinement is not None:
            side = self.patch_nums[-1]
            f_hat = f_hat + refinement.transpose(1, 2).reshape(f_hat.shape[0], -1, side, side)
        return f_hat

    def next_scale_input(self, f_hat: Tensor, si: int) -> Tensor:
        """The transformer's input for scale ``si + 1``: f_hat area-downsampled, (B, pn^2, C)."""
        pn = self.patch_nums[si + 1]
        z = F.interpolate(f_hat, size=(pn, pn), mode="area")
        return z.flatten(2).transpose(1, 2)

    def teacher_forcing_inputs(self, indices: list[Tensor]) -> Tensor:
        """Inputs of scales 1..SN-1 from ground-truth indices: (B, L - pn_0^2, C).

        f_hat after scales 0..si, area-downsampled to the next side (the authors'
        ``idxBl_to_var_input``); the last scale's indices are not needed.
        """
        self._check_indices(indices, self.num_scales - 1)
        f_hat = self.scale_contribution(indices[0], 0)
        inputs = [self.next_scale_input(f_hat, 0)]
        for si in range(1, self.num_scales - 1):
            f_hat = f_hat + self.scale_contribution(indices[si], si)
            inputs.append(self.next_scale_input(f_hat, si))
        return torch.cat(inputs, dim=1)


class MultiScaleVQVAE(nn.Module):
    """VARSR's VQ-VAE tokenizer; defaults are the released model's sizes (109 M parameters).

    Images are in [-1, 1] and their side must be ``patch_nums[-1] * downsample`` (512 for
    the released model). With ``test_mode`` the module is in eval mode with frozen weights,
    as the authors build it.
    """

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, using_znorm: bool = False, dropout: float = 0.0,
                 using_sa: bool = True, using_mid_sa: bool = True, quant_conv_ks: int = 3,
                 test_mode: bool = True) -> None:
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, z_channels
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        sizes = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     z_channels=z_channels, dropout=dropout, using_sa=using_sa,
                     using_mid_sa=using_mid_sa)
        self.encoder = VAEEncoder(**sizes)
        self.decoder = VAEDecoder(**sizes)
        self.quantize = ResidualQuantizer(vocab_size, z_channels, self.patch_nums, quant_resi,
                                          share_quant_resi, using_znorm)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def features(self, img: Tensor) -> Tensor:
        """Image (B, 3, S, S) in [-1, 1] -> continuous features (B, Cvae, pn_last, pn_last)."""
        if img.dim() != 4 or img.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(img.shape)}")
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def encode(self, img: Tensor) -> MultiScaleTokens:
        """Image in [-1, 1] -> per-scale indices, f_hat and the last-scale residual."""
        return self.quantize.quantize(self.features(img))

    @overload
    def encode_indices(self, img: Tensor, with_residual: Literal[False] = ...) -> list[Tensor]:
        ...

    @overload
    def encode_indices(self, img: Tensor,
                       with_residual: Literal[True]) -> tuple[list[Tensor], Tensor]:
        ...

    def encode_indices(self, img: Tensor, with_residual: bool = False):
        """Image in [-1, 1] -> [(B, pn*pn) LongTensor per scale], and with ``with_residual``
        also the continuous residual entering the last scale (B, pn_last^2, Cvae), which
        VARSR keeps as its refiner's target (VAR has no such output)."""
        tokens = self.encode(img)
        return (tokens.indices, tokens.last_residual) if with_residual else tokens.indices

    def teacher_forcing_inputs(self, indices: list[Tensor]) -> Tensor:
        """(B, L - pn_0^2, Cvae): the next-scale inputs of VAR/VARSR training."""
        return self.quantize.teacher_forcing_inputs(indices)

    def indices_to_fhat(self, indices: list[Tensor], refinement: Tensor | None = None) -> Tensor:
        """Per-scale indices (and optionally the refiner's last-scale correction) -> f_hat."""
        return self.quantize.indices_to_fhat(indices, refinement)

    def decode(self, f_hat: Tensor) -> Tensor:
        """f_hat -> image in [-1, 1]: decoder(post_quant_conv(f_hat)), clamped."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def fhat_to_img01(self, f_hat: Tensor) -> Tensor:
        """f_hat -> image in [0, 1], what VARSR's inference returns."""
        return self.decode(f_hat).add(1).mul(0.5)

    def indices_to_img(self, indices: list[Tensor]) -> Tensor:
        """Per-scale indices -> image in [-1, 1]."""
        return self.decode(self.indices_to_fhat(indices))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but keeps this model's ``ema_vocab_hit_SV`` when the checkpoint's
        has another number of scales (the authors' override: it is a training statistic)."""
        key = "quantize.ema_vocab_hit_SV"
        own = self.quantize.ema_vocab_hit_SV
        if key in state_dict and tuple(state_dict[key].shape) != tuple(own.shape):
            state_dict = {**state_dict, key: own}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
