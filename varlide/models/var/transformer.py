"""VARSR's conditional VAR transformer (``VAR_RoPE``), checkpoint-compatible, pure torch.

The module tree mirrors the released ``var_wo_ddp`` state dict (qyp2000/VARSR ``models/
var.py``, ``models/basic_var.py``) minus the ``diffloss.*`` refiner, which lives elsewhere;
load the checkpoint with those keys filtered out and ``strict=True``.

Sequence (released sizes): 1024 LR-prefix tokens (a ControlNet-style conv embedding of the
LR image) + 1 class token (``class_emb(label)``), then scales ``pn = 2..32`` (2239 tokens),
3264 in all. Start tokens get ``pos_start`` and ``lvl_embed(0)``; scale tokens are
``word_embed`` of the teacher-forcing maps plus ``lvl_embed(si)``; positions enter only through
the rotary embedding (:mod:`varlide.models.var.rope`). Attention is block-causal: a token sees
every token of its own and of earlier scales (the prefix and the class token form level 0).
AdaLN is conditioned on ``class_emb(label)`` alone.

CFG, sampling, the token-map bookkeeping (``f_hat``) and the refiner are the caller's: the
cached path only turns a scale's input map into that scale's logits and hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varlide.models.var.rope import RotaryEmbedding, SARoPE, apply_rotary

RELEASED_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
RELEASED_COND_CHANNELS: tuple[int, ...] = (32, 128, 256, 512, 1536)
"""Widths of VARSR's conditioning embedding (hard-coded in ``VAR_RoPE.__init__``)."""


class ConditioningEmbedding(nn.Module):
    """LR image -> prefix features: conv_in + SiLU, per step (conv 3x3 + SiLU, stride-2 conv
    3x3 + SiLU), conv_out without activation. ``2 ** (len(channels) - 1)`` times smaller."""

    def __init__(self, out_channels: int, channels: tuple[int, ...] = RELEASED_COND_CHANNELS,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth (timm's), active only in training."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


@dataclass
class _LayerCache:
    """Rotated keys and values of every token seen so far, (B, H, L, D) each."""

    k: Tensor | None = None
    v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q, k (a learned per-head temperature, softmax
    scale 1) and RoPE applied after the normalisation; k has no bias (``zero_k_bias``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100.0)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # in the checkpoint
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rot: Tensor, attn_bias: Tensor | None = None,
                cache: _LayerCache | None = None) -> Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1).mul(scale_mul)
        k = F.normalize(k, dim=-1)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        if cache is not None:
            k, v = cache.extend(k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                             attn_mask=attn_bias, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    """C -> ratio*C -> C with tanh-approximated GELU."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """Pre-norm block; ``ada_lin`` (SiLU -> Linear(C, 6C)) gives, in this order, gamma1,
    gamma2, scale1, scale2, shift1, shift2. LayerNorms have no affine."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.width, self.eps, self.drop_path = width, eps, drop_path
        self.attn = SelfAttention(width, heads)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def _ln(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.width,), eps=self.eps)

    def forward(self, x: Tensor, cond: Tensor, rot: Tensor, attn_bias: Tensor | None = None,
                cache: _LayerCache | None = None) -> Tensor:
        mods = self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.attn(self._ln(x) * (scale1 + 1) + shift1, rot, attn_bias, cache)
        x = x + _drop_path(h * gamma1, self.drop_path, self.training)
        h = self.ffn(self._ln(x) * (scale2 + 1) + shift2)
        return x + _drop_path(h * gamma2, self.drop_path, self.training)


class AdaLNHeadNorm(nn.Module):
    """LayerNorm (no affine) modulated by SiLU -> Linear(C, 2C) = (scale, shift)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width, self.eps = width, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return F.layer_norm(x, (self.width,), eps=self.eps) * (scale + 1) + shift


@dataclass
class TeacherForcingOutput:
    """``logits`` (B, L, V) fp32, from the class token on; ``last_hidden`` (B, pn_last^2, C):
    the last block's output on the last scale, the refiner's condition before
    :meth:`VARTransformer.refiner_condition`."""

    logits: Tensor
    last_hidden: Tensor


@dataclass
class ScaleOutput:
    """One scale of cached inference: ``logits`` (B, pn^2, V) fp32, ``hidden`` (B, pn^2, C)."""

    logits: Tensor
    hidden: Tensor


@dataclass
class _InferenceState:
    cond: Tensor
    layers: list[_LayerCache] = field(default_factory=list)
    next_scale: int = 1


class VARTransformer(nn.Module):
    """VARSR's ``VAR_RoPE`` without the refiner: every size is an argument, defaults = release.

    ``rope`` replaces the default :class:`SARoPE` (e.g. by SF-RoPE); it must cover the same
    segments. ``drop_path_rate`` (0.1 in the release) only acts in training mode.
    """

    def __init__(self, depth: int = 24, width: int = 1536, heads: int = 24,
                 mlp_ratio: float = 4.0, vocab_size: int = 4096, cvae: int = 32,
                 patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS, num_classes: int = 2,
                 cond_channels: tuple[int, ...] = RELEASED_COND_CHANNELS,
                 prefix_side: int = 32, norm_eps: float = 1e-6, drop_path_rate: float = 0.1,
                 rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        if patch_nums[0] != 1:
            raise ValueError("patch_nums[0] must be 1: the class token stands for scale 0")
        self.depth, self.width, self.heads = depth, width, heads
        self.vocab_size, self.cvae, self.num_classes = vocab_size, cvae, num_classes
        self.patch_nums, self.prefix_side = tuple(patch_nums), prefix_side
        self.image_downsample = 2 ** (len(cond_channels) - 1)
        self.L = sum(pn * pn for pn in self.patch_nums)  # 2240: the predicted tokens
        self.first_l = prefix_side**2 + 1  # 1025: prefix + class token
        self.seq_len = self.first_l + self.L - 1  # 3264
        init_std = math.sqrt(1 / width / 3)

        self.con_embedding = ConditioningEmbedding(width, tuple(cond_channels))
        self.word_embed = nn.Linear(cvae, width)
        self.class_emb = nn.Embedding(num_classes, width)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), width)
        for t in (self.class_emb.weight, self.pos_start, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, std=init_std)
        self.rope = rope if rope is not None else SARoPE(width // heads, self.patch_nums,
                                                         prefix_side)
        if self.rope.segment_lengths[0] != self.first_l or self.rope.num_tokens != self.seq_len:
            raise ValueError("the rotary embedding does not cover this sequence")
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            AdaLNBlock(width, heads, mlp_ratio, norm_eps, rates[i]) for i in range(depth))
        self._register_level_buffers()
        self.head_nm = AdaLNHeadNorm(width, norm_eps)
        self.head = nn.Linear(width, vocab_size)
        self.decoder_norm = nn.LayerNorm(width, eps=norm_eps)
        self._state: _InferenceState | None = None

    def _register_level_buffers(self) -> None:
        """``lvl_1L`` (1, N) and the block-causal ``attn_bias_for_masking`` (1, 1, N, N), both
        stored in the checkpoint: query i sees key j iff level(i) >= level(j)."""
        levels = torch.cat([torch.zeros(self.first_l, dtype=torch.long)]
                           + [torch.full((pn * pn,), si, dtype=torch.long)
                              for si, pn in enumerate(self.patch_nums) if si > 0])
        self.register_buffer("lvl_1L", levels.view(1, -1).contiguous())
        visible = levels.view(-1, 1) >= levels.view(1, -1)
        bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
        self.register_buffer("attn_bias_for_masking",
                             bias.view(1, 1, self.seq_len, self.seq_len).contiguous())

    @property
    def image_side(self) -> int:
        """Side of the LR image the prefix expects (512 at the released sizes)."""
        return self.prefix_side * self.image_downsample

    def scale_bounds(self, si: int) -> tuple[int, int]:
        """[start, end) of scale ``si``'s input tokens in the full sequence (si = 0: start)."""
        starts = self.rope.segment_starts
        return starts[si], starts[si + 1]

    def embed_prefix(self, lr_image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, prefix_side^2, C), row-major like the RoPE grid."""
        h = self.con_embedding(lr_image)
        if h.shape[-2:] != (self.prefix_side, self.prefix_side):
            raise ValueError(f"LR image must be {self.image_side}^2, got {tuple(lr_image.shape)}")
        return h.flatten(2).transpose(1, 2)

    def _start_tokens(self, prefix: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        """cat(prefix, class_emb(label)) + pos_start + lvl_embed(0); and the AdaLN condition."""
        if label.shape[0] % prefix.shape[0]:
            raise ValueError("label batch must be a multiple of the image batch")
        prefix = prefix.repeat(label.shape[0] // prefix.shape[0], 1, 1)  # CFG: [cond; uncond]
        cond = self.class_emb(label)
        sos = torch.cat((prefix, cond.unsqueeze(1)), dim=1) + self.pos_start
        return sos + self.lvl_embed(self.lvl_1L[:, : self.first_l]), cond

    def logits(self, hidden: Tensor, cond: Tensor) -> Tensor:
        """head(head_nm(h, cond)) in fp32, as VARSR's ``get_logits``."""
        return self.head(self.head_nm(hidden.float(), cond).float()).float()

    def refiner_condition(self, last_hidden: Tensor, code_embedding: Tensor) -> Tensor:
        """decoder_norm(last-scale hidden + word_embed(E[idx_last])): the refiner's input z."""
        return self.decoder_norm(last_hidden + self.word_embed(code_embedding))

    def forward_teacher_forcing(self, lr_image: Tensor, label: Tensor,
                                x_BLCv_wo_first_l: Tensor) -> TeacherForcingOutput:
        """Uncached forward over the whole sequence with the block-causal mask.

        ``x_BLCv_wo_first_l`` (B, L - 1, Cvae): the input maps of scales 1.. (interpolated
        ``f_hat``), concatenated. Start tokens are built in fp32 (autocast off), as VARSR does.
        """
        if x_BLCv_wo_first_l.shape[1:] != (self.L - 1, self.cvae):
            raise ValueError(f"expected (B, {self.L - 1}, {self.cvae}) scale inputs, "
                             f"got {tuple(x_BLCv_wo_first_l.shape)}")
        with torch.autocast(lr_image.device.type, enabled=False):
            sos, cond = self._start_tokens(self.embed_prefix(lr_image), label)
            words = self.word_embed(x_BLCv_wo_first_l.float())
            words = words + self.lvl_embed(self.lvl_1L[:, self.first_l:])
            x = torch.cat((sos, words), dim=1)
        rot = self.rope.sequence(x_BLCv_wo_first_l, device=x.device)
        for block in self.blocks:
            x = block(x, cond, rot, self.attn_bias_for_masking)
        last = x[:, -self.patch_nums[-1] ** 2:]
        return TeacherForcingOutput(self.logits(x[:, self.first_l - 1:], cond), last)

    forward = forward_teacher_forcing

    def _run_cached(self, x: Tensor, rot: Tensor) -> Tensor:
        state = self._state
        assert state is not None
        for block, cache in zip(self.blocks, state.layers, strict=True):
            x = block(x, state.cond, rot, None, cache)
        return x

    def prefill(self, lr_image: Tensor, label: Tensor) -> ScaleOutput:
        """Start cached inference: run prefix + class token, return scale 0's logits (B, 1, V).

        For CFG pass the doubled labels (cond then uncond) with the B images once: the prefix
        is repeated, as VARSR's ``lr_inp.repeat(2, 1, 1)``. Only the class token's logits are
        computed (VARSR keeps only that position at si = 0).
        """
        x, cond = self._start_tokens(self.embed_prefix(lr_image), label)
        self._state = _InferenceState(cond, [_LayerCache() for _ in self.blocks])
        x = self._run_cached(x, self.rope.segment(0, None, device=x.device))
        hidden = x[:, -1:]
        return ScaleOutput(self.logits(hidden, cond), hidden)

    def step(self, scale_index: int, tokens_in: Tensor) -> ScaleOutput:
        """Feed scale ``scale_index`` (>= 1) its input map (B, pn^2, Cvae) -> its logits.

        ``tokens_in`` is the area-interpolated ``f_hat`` (before ``word_embed``), with the same
        (doubled) batch as :meth:`prefill`; scales must come in order.
        """
        state = self._state
        if state is None:
            raise RuntimeError("call prefill() first")
        if scale_index != state.next_scale:
            raise ValueError(f"expected scale {state.next_scale}, got {scale_index}")
        pn = self.patch_nums[scale_index]
        if tokens_in.shape[1:] != (pn * pn, self.cvae) or tokens_in.shape[0] != state.cond.shape[0]:
            raise ValueError(f"scale {scale_index} takes ({state.cond.shape[0]}, {pn * pn}, "
                             f"{self.cvae}), got {tuple(tokens_in.shape)}")
        x = self.word_embed(tokens_in) + self.lvl_embed.weight[scale_index]
        x = self._run_cached(x, self.rope.segment(scale_index, tokens_in, device=x.device))
        state.next_scale += 1
        if state.next_scale == len(self.patch_nums):
            self._state = None  # the last scale: free the cache
        return ScaleOutput(self.logits(x, state.cond), x)

    def reset_cache(self) -> None:
        """Drop the KV cache (an interrupted generation)."""
        self._state = None
