"""VARSR's transformer: checkpoint layout, cached == uncached, block-causal mask, SA-RoPE."""

from __future__ import annotations

import pytest
import torch
from var_helpers import cached_logits, transformer_inputs

from varlide.models.var.rope import (
    RotaryEmbedding,
    SARoPE,
    apply_rotary,
    rotation_from_angles,
    sa_rope_positions,
)
from varlide.models.var.transformer import RELEASED_PATCH_NUMS, VARTransformer

TINY = dict(depth=2, width=64, heads=2, vocab_size=32, cvae=8, patch_nums=(1, 2, 3),
            prefix_side=3, cond_channels=(8, 16))
SIDE = 6  # prefix side 3 x 2 (one stride-2 conv)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **kw) -> VARTransformer:
    torch.manual_seed(seed)
    model = VARTransformer(**{**TINY, **kw}).eval()
    with torch.no_grad():  # non-trivial AdaLN gammas, biases and temperatures
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _inputs(model: VARTransformer, b: int = 2, seed: int = 1):
    return transformer_inputs(model, SIDE, b, seed)


def test_full_size_state_dict_matches_the_released_layout(varsr_layout):
    layout = varsr_layout["var_wo_ddp"]
    expected = {k: v for k, v in layout.items() if not k.startswith("diffloss.")}
    with torch.device("meta"):
        model = VARTransformer()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    assert got == expected
    assert len(got) == 345 and len(layout) - len(got) == 60


def test_checkpoint_buffers_are_stored_and_rope_is_not():
    model = _tiny()
    sd = model.state_dict()
    for key in ("lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias",
                "blocks.1.attn.scale_mul_1H11"):
        assert key in sd
    assert not any("freqs" in k or k.startswith("rope.") for k in sd)
    n = model.seq_len
    assert n == 3 * 3 + 1 + 4 + 9  # prefix, class token, scales pn = 2 and 3
    assert sd["lvl_1L"].tolist() == [[0] * 10 + [1] * 4 + [2] * 9]
    assert sd["attn_bias_for_masking"].shape == (1, 1, n, n)
    with torch.device("meta"):
        full = VARTransformer()
    assert (full.first_l, full.L, full.seq_len, full.image_side) == (1025, 2240, 3264, 512)


def test_teacher_forcing_shapes():
    model = _tiny()
    lr, x = _inputs(model, b=3)
    with torch.no_grad():
        out = model.forward_teacher_forcing(lr, torch.tensor([0, 1, 0]), x)
    assert out.logits.shape == (3, model.L, 32) and out.logits.dtype == torch.float32
    assert out.last_hidden.shape == (3, 9, 64)
    cond = model.refiner_condition(out.last_hidden, torch.randn(3, 9, 8))
    assert cond.shape == (3, 9, 64)


def test_cached_path_equals_teacher_forcing_with_a_doubled_batch():
    model = _tiny()
    lr, x = _inputs(model, b=2)
    label = torch.tensor([0, 0, 1, 1])  # CFG: cond half then uncond half, same LR images
    x2 = x.repeat(2, 1, 1)
    with torch.no_grad():
        ref = model.forward_teacher_forcing(lr.repeat(2, 1, 1, 1), label, x2).logits
        cached = cached_logits(model, lr, label, x2)
    assert [c.shape[1] for c in cached] == [1, 4, 9]
    torch.testing.assert_close(torch.cat(cached, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[:2], ref[2:], atol=1e-3)  # the label does matter


def test_cached_path_checks_its_order():
    model = _tiny()
    lr, x = _inputs(model, b=1)
    with pytest.raises(RuntimeError):
        model.step(1, x[:, :4])
    with torch.no_grad():
        model.prefill(lr, torch.tensor([0]))
        with pytest.raises(ValueError):
            model.step(2, x[:, 4:])
        with pytest.raises(ValueError):
            model.step(1, x[:, :3])


@pytest.mark.parametrize("k", [1, 2])
def test_block_causal_mask_hides_later_scales(k: int):
    model = _tiny()
    lr, x = _inputs(model, b=2)
    label = torch.tensor([0, 1])
    a, b = (s - model.first_l for s in model.scale_bounds(k))
    x_changed = x.clone()
    x_changed[:, a:b] += 3.0
    with torch.no_grad():
        base = model.forward_teacher_forcing(lr, label, x).logits
        changed = model.forward_teacher_forcing(lr, label, x_changed).logits
    start = 1 + a  # logits index: the class token (scale 0) is index 0
    torch.testing.assert_close(changed[:, :start], base[:, :start], atol=0, rtol=0)
    assert (changed[:, start:start + b - a] - base[:, start:start + b - a]).abs().max() > 1e-3


def test_sa_rope_rotation_is_unit_and_positions_follow_the_grid_rule():
    rope = SARoPE(64, RELEASED_PATCH_NUMS)
    table = rope.sequence()
    assert table.shape == (3264, 32) and table.dtype == torch.complex64
    torch.testing.assert_close(table.abs(), torch.ones(3264, 32), atol=1e-6, rtol=0)
    assert rope.sides == (32, 1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    pos = rope.positions
    # the prefix 32x32, the class token at (0, 0), then scale pn at (r / pn * 32, c / pn * 32)
    assert pos[:1024].tolist() == [[float(r), float(c)] for r in range(32) for c in range(32)]
    assert pos[1024].tolist() == [0.0, 0.0]
    start = rope.segment_starts[4]  # segment 4 = scale 4, pn = 6
    for idx in (0, 7, 35):
        r, c = divmod(idx, 6)
        assert pos[start + idx].tolist() == pytest.approx([r / 6 * 32, c / 6 * 32])
    freqs = 1.0 / 10000 ** (torch.arange(0, 64, 4).double() / 64)
    r, c = pos[start + 7].double()
    angles = torch.cat((r * freqs, c * freqs))
    torch.testing.assert_close(table[start + 7].angle().double(),
                               torch.atan2(angles.sin(), angles.cos()), atol=1e-5, rtol=0)
    assert rope.segment(0).shape == (1025, 32) and rope.segment(9).shape == (1024, 32)
    torch.testing.assert_close(sa_rope_positions((2,), 32), torch.tensor(
        [[0.0, 0.0], [0.0, 16.0], [16.0, 0.0], [16.0, 16.0]]))


def test_apply_rotary_rotates_interleaved_pairs_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    angles = torch.randn(5, 4, generator=g)
    out = apply_rotary(x, rotation_from_angles(angles))
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * cos - odd * sin)
    torch.testing.assert_close(out[..., 1::2], even * sin + odd * cos)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert apply_rotary(x.half(), rotation_from_angles(angles)).dtype == torch.float16
    batched = rotation_from_angles(angles).expand(2, -1, -1)
    torch.testing.assert_close(apply_rotary(x, batched), out)


class _InputDependentRope(RotaryEmbedding):
    """A stand-in for SF-RoPE: SA-RoPE plus a per-sample angle read from the scale's input."""

    def __init__(self, base: SARoPE) -> None:
        super().__init__(base.head_dim, base.segment_lengths)
        self.base = base
        self.lam = torch.nn.Parameter(torch.tensor(0.7))

    def segment(self, si, scale_input=None, device=None):
        rot = self.base.segment(si, device=device)
        if scale_input is None:
            return rot
        phase = scale_input.mean(-1, keepdim=True).float() * self.lam  # (B, l, 1)
        return rot * rotation_from_angles(phase.expand(-1, -1, rot.shape[-1]))


def test_a_custom_rotary_embedding_plugs_in_and_keeps_the_cache_consistent():
    plain = _tiny()
    model = VARTransformer(**TINY, rope=_InputDependentRope(plain.rope)).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["rope.lam"] and unexpected == []
    lr, x = _inputs(model, b=2)
    label = torch.tensor([0, 1])
    with torch.no_grad():
        ref = model.forward_teacher_forcing(lr, label, x).logits
        cached = torch.cat(cached_logits(model, lr, label, x), dim=1)
        sa = plain.forward_teacher_forcing(lr, label, x).logits
        model.rope.lam.zero_()  # lambda 0: SA-RoPE exactly
        at_zero = model.forward_teacher_forcing(lr, label, x).logits
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)
    assert (sa - ref).abs().max() > 1e-4
    torch.testing.assert_close(at_zero, sa, atol=0, rtol=0)
