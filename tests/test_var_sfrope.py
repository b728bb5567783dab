"""SF-RoPE: lambda = 0 is SA-RoPE bit for bit, cached == uncached, gradients, layout, phases."""

from __future__ import annotations

import math

import pytest
import torch
from var_helpers import cached_logits, transformer_inputs

from varlide.models.var.rope import SARoPE, rotation_from_angles
from varlide.models.var.sfrope import (
    SFRoPE,
    fuse_rotations,
    load_released_state_dict,
    phase_features,
    sfrope_state_keys,
)
from varlide.models.var.transformer import RELEASED_PATCH_NUMS, VARTransformer

TINY = dict(depth=2, width=64, heads=2, vocab_size=32, cvae=8, patch_nums=(1, 2, 3),
            prefix_side=3, cond_channels=(8, 16))
SIDE = 6  # prefix side 3 x 2 (one stride-2 conv)
SF_KEYS = ["rope.sfrope_lambda_raw", "rope.sfrope_phase.weight"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _sf(fusion: str = "angle", lambda_shape: str = "global") -> SFRoPE:
    return SFRoPE(32, TINY["patch_nums"], TINY["cvae"], prefix_side=3, fusion=fusion,
                  lambda_shape=lambda_shape)


def _pair(fusion: str = "angle", lambda_shape: str = "global", seed: int = 0):
    """A perturbed SA-RoPE model and the same weights with a fresh SF-RoPE."""
    torch.manual_seed(seed)
    plain = VARTransformer(**TINY).eval()
    with torch.no_grad():  # non-trivial AdaLN gammas, biases and temperatures
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model = VARTransformer(**TINY, rope=_sf(fusion, lambda_shape)).eval()
    load_released_state_dict(model, plain.state_dict())
    return plain, model


def _inputs(model: VARTransformer, b: int = 2, seed: int = 1):
    return transformer_inputs(model, SIDE, b, seed)


@pytest.mark.parametrize("fusion", ["angle", "complex"])
@pytest.mark.parametrize("lambda_shape", ["global", "pair"])
def test_fresh_sfrope_is_sa_rope_bit_for_bit(fusion: str, lambda_shape: str):
    sf, sa = _sf(fusion, lambda_shape), SARoPE(32, TINY["patch_nums"], 3)
    assert float(sf.lam.detach().abs().max()) == 0.0
    assert sf.sfrope_phase.weight.abs().max() > 0  # random, matters only through lambda
    x = torch.randn(3, sf.num_tokens - sf.segment_lengths[0], TINY["cvae"])
    rot = sf.sequence(x)
    assert rot.shape == (3, sf.num_tokens, 16) and rot.dtype == torch.complex64
    assert torch.equal(rot, sa.sequence().expand(3, -1, -1))
    assert torch.equal(sf.segment(0), sa.segment(0))


@pytest.mark.parametrize("fusion", ["angle", "complex"])
def test_lambda_zero_transformer_equals_sa_rope_bit_for_bit(fusion: str):
    plain, model = _pair(fusion)
    lr, x = _inputs(model)
    label = torch.tensor([0, 1])
    with torch.no_grad():
        ref, out = (m.forward_teacher_forcing(lr, label, x) for m in (plain, model))
        assert torch.equal(out.logits, ref.logits)
        assert torch.equal(out.last_hidden, ref.last_hidden)
        for got, want in zip(cached_logits(model, lr, label, x),
                             cached_logits(plain, lr, label, x), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("fusion", ["angle", "complex"])
@pytest.mark.parametrize("lambda_shape", ["global", "pair"])
def test_nonzero_lambda_cached_equals_teacher_forcing(fusion: str, lambda_shape: str):
    plain, model = _pair(fusion, lambda_shape)
    lam = 0.6 if lambda_shape == "global" else torch.linspace(0.1, 0.9, 16)
    model.rope.set_lambda(lam)
    torch.testing.assert_close(model.rope.lam, torch.as_tensor(lam).float().expand(
        model.rope.sfrope_lambda_raw.shape), atol=1e-6, rtol=0)
    lr, x = _inputs(model)
    label = torch.tensor([0, 0, 1, 1])  # CFG: cond half then uncond half, same LR images
    x2 = x.repeat(2, 1, 1)
    with torch.no_grad():
        ref = model.forward_teacher_forcing(lr.repeat(2, 1, 1, 1), label, x2).logits
        cached = torch.cat(cached_logits(model, lr, label, x2), dim=1)
        sa = plain.forward_teacher_forcing(lr.repeat(2, 1, 1, 1), label, x2).logits
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)
    assert (ref - sa).abs().max() > 1e-4  # the frequency branch is live
    torch.testing.assert_close(ref[:, :1], sa[:, :1], atol=0, rtol=0)  # scale 0: SA only


@pytest.mark.parametrize("fusion", ["angle", "complex"])
def test_gradients_reach_lambda_and_the_projection(fusion: str):
    _, model = _pair(fusion)
    lr, x = _inputs(model)
    label = torch.tensor([0, 1])
    rope = model.rope

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.forward_teacher_forcing(lr, label, x).logits.square().mean().backward()
        return rope.sfrope_lambda_raw.grad, rope.sfrope_phase.weight.grad

    g_lam, g_proj = grads()  # lambda = 0: lambda learns (one-sided derivative), W waits
    assert g_lam is not None and g_lam.abs() > 0
    assert g_proj is not None and torch.equal(g_proj, torch.zeros_like(g_proj))
    rope.set_lambda(0.4)
    g_lam, g_proj = grads()
    assert g_lam.abs() > 0 and g_proj.abs().max() > 0
    assert torch.isfinite(g_proj).all()


def test_lambda_is_clamped_at_zero_but_never_frozen():
    sf = _sf()
    with torch.no_grad():
        sf.sfrope_lambda_raw.fill_(-0.3)
    lam = sf.lam
    assert float(lam.detach()) == 0.0  # forward: max(tanh(raw), 0)
    lam.backward()
    assert float(sf.sfrope_lambda_raw.grad) == pytest.approx(1 - math.tanh(-0.3) ** 2)
    sf.set_lambda(0.25)
    assert float(sf.lam.detach()) == pytest.approx(0.25, abs=1e-7)


def test_angle_fusion_is_the_literal_fused_angle():
    sf = _sf("angle")
    sf.set_lambda(0.3)
    x = torch.randn(2, sf.num_tokens - sf.segment_lengths[0], TINY["cvae"])
    a, b = sf.segment_starts[2], sf.segment_starts[3]
    with torch.no_grad():
        theta_f = phase_features(x[:, 4:], 3) @ sf.sfrope_phase.weight.T
        want = rotation_from_angles(0.3 * theta_f + 0.7 * sf.angles[a:b])
        got = sf.segment(2, x[:, 4:])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.abs(), torch.ones_like(got.abs()), atol=1e-6, rtol=0)


def test_complex_fusion_shrinks_the_modulus_and_can_cancel():
    sf = _sf("complex")
    sf.set_lambda(0.5)
    x = torch.randn(2, sf.num_tokens - sf.segment_lengths[0], TINY["cvae"])
    with torch.no_grad():
        rot = sf.sequence(x)
    first = sf.segment_lengths[0]
    assert torch.equal(rot[:, :first], sf.freqs_cis[:first].expand(2, -1, -1))
    modulus = rot[:, first:].abs()
    assert modulus.max() < 1.0 and modulus.min() < 0.9
    # the hazard: near-opposite angles cancel at lambda 0.5; angle fusion stays a rotation
    theta_s = torch.linspace(0, 6, 16)
    lam = torch.tensor(0.5)
    opposite = theta_s + math.pi
    cancel = fuse_rotations(opposite, theta_s, rotation_from_angles(theta_s), lam, "complex")
    assert cancel.abs().max() < 1e-6
    fused = fuse_rotations(opposite, theta_s, rotation_from_angles(theta_s), lam, "angle")
    torch.testing.assert_close(fused.abs(), torch.ones(16), atol=1e-6, rtol=0)


def test_phase_features_handle_hermitian_pairs_tiny_maps_and_empty_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    feats = phase_features(x, 3)  # (B, 9, 2C): cos then sin
    assert feats.shape == (2, 9, 8)
    cos, sin = feats[..., :4], feats[..., 4:]
    for r in range(3):  # real input: bin (r, c) and (-r, -c) are conjugate
        for c in range(3):
            i, j = r * 3 + c, ((-r) % 3) * 3 + (-c) % 3
            torch.testing.assert_close(cos[:, i], cos[:, j], atol=1e-5, rtol=0)
            torch.testing.assert_close(sin[:, i], -sin[:, j], atol=1e-5, rtol=0)
    tiny = phase_features(torch.randn(2, 4, 4, generator=g), 2)  # every 2x2 bin is real
    assert tiny[..., 4:].abs().max() < 1e-5
    torch.testing.assert_close(tiny[..., :4].abs(), torch.ones(2, 4, 4), atol=1e-5, rtol=0)
    # a phase of +-pi (a negative real bin, sign of a zero imaginary part) gives one feature
    neg = torch.tensor([[[-1.0], [0.0], [0.0], [0.0]]])
    jitter = neg + torch.tensor([[[0.0], [1e-7], [-1e-7], [0.0]]])
    torch.testing.assert_close(phase_features(neg, 2), phase_features(jitter, 2), atol=1e-6,
                               rtol=0)
    empty = phase_features(torch.zeros(1, 4, 3), 2)
    assert torch.equal(empty, torch.cat((torch.ones(1, 4, 3), torch.zeros(1, 4, 3)), -1))


def test_rotation_stays_fp32_under_autocast_and_rejects_bad_inputs():
    sf = _sf()
    sf.set_lambda(0.5)
    x = torch.randn(2, sf.num_tokens - sf.segment_lengths[0], TINY["cvae"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rot = sf.sequence(x)
    assert rot.dtype == torch.complex64
    with pytest.raises(ValueError):
        sf.sequence()
    with pytest.raises(ValueError):
        sf.segment(1, None)
    with pytest.raises(ValueError):
        sf.segment(1, x[:, :3])
    with pytest.raises(ValueError):
        sf.segment(1, x[:, :4, :3])
    with pytest.raises(ValueError):
        sf.set_lambda(1.0)
    with pytest.raises(ValueError):
        SFRoPE(32, TINY["patch_nums"], 8, prefix_side=3, fusion="sum")


def test_released_load_allows_exactly_the_sfrope_keys():
    plain, model = _pair()
    assert sfrope_state_keys(model) == SF_KEYS
    assert model.rope.sfrope_parameter_names("rope.") == SF_KEYS
    sd = plain.state_dict()
    load_released_state_dict(model, model.state_dict())  # a fine-tuned state dict: all keys
    broken = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(RuntimeError, match="head.bias"):
        load_released_state_dict(model, broken)
    with pytest.raises(RuntimeError, match="extra"):
        load_released_state_dict(model, {**sd, "extra": torch.zeros(1)})
    partial = {**sd, SF_KEYS[0]: torch.zeros(())}
    with pytest.raises(RuntimeError):
        load_released_state_dict(model, partial)


def test_full_size_layout_is_the_release_plus_the_sfrope_parameters(varsr_layout):
    layout = varsr_layout["var_wo_ddp"]
    expected = {k: v for k, v in layout.items() if not k.startswith("diffloss.")}
    with torch.device("meta"):
        model = VARTransformer(rope=SFRoPE(64, RELEASED_PATCH_NUMS, 32, prefix_side=32))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(got) - set(expected) == set(SF_KEYS)
    assert {k: got[k] for k in expected} == expected
    assert got["rope.sfrope_lambda_raw"] == [] and got["rope.sfrope_phase.weight"] == [32, 64]
    assert sfrope_state_keys(model) == SF_KEYS
