"""VARSR's multi-scale VQ-VAE tokenizer: checkpoint layout, scale semantics, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from varlide.models.var import RELEASED_PATCH_NUMS, MultiScaleVQVAE
from varlide.models.var.vqvae import phi_index, phi_ticks

TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
SIDE = 8  # 4 tokens x 2 (one downsampling)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(**TINY)
    with torch.no_grad():  # default inits leave biases small; perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIDE, SIDE, generator=g) * 2 - 1


def test_full_size_state_dict_matches_the_released_layout(varsr_layout):
    expected = varsr_layout["vae_local"]
    with torch.device("meta"):
        model = MultiScaleVQVAE()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    assert got == expected
    assert len(got) == 324
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_phi_choice_matches_numpy_linspace_including_float_ties():
    np = pytest.importorskip("numpy")
    for count in range(2, 9):
        edge = 1 / 3 / count if count == 4 else 1 / 2 / count
        ticks = np.linspace(edge, 1 - edge, count)
        assert phi_ticks(count) == ticks.tolist()
        for n in range(2, 20):
            want = [int(np.argmin(np.abs(ticks - si / (n - 1)))) for si in range(n)]
            assert [phi_index(si, n, count) for si in range(n)] == want
    # released: 10 scales, 4 convs; si = 2 and 7 are exact ties broken by rounding
    released = [phi_index(si, len(RELEASED_PATCH_NUMS), 4) for si in range(10)]
    assert released == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_encode_shapes_and_reconstruction_path():
    model = _tiny()
    img = _images()
    tokens = model.encode(img)
    assert [t.shape for t in tokens.indices] == [(2, pn * pn) for pn in TINY["patch_nums"]]
    assert all(t.dtype == torch.long for t in tokens.indices)
    assert tokens.f_hat.shape == (2, 8, 4, 4)
    assert tokens.last_residual.shape == (2, 16, 8)
    indices, residual = model.encode_indices(img, with_residual=True)
    assert torch.equal(residual, tokens.last_residual)
    assert all(torch.equal(a, b) for a, b in zip(indices, model.encode_indices(img), strict=True))
    f_hat = model.indices_to_fhat(tokens.indices)
    assert torch.equal(f_hat, tokens.f_hat)
    out = model.decode(f_hat)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(model.indices_to_img(tokens.indices), out)
    assert torch.allclose(model.fhat_to_img01(f_hat), (out + 1) / 2)
    with pytest.raises(ValueError):
        model.encode(torch.zeros(1, 3, SIDE * 2, SIDE * 2))


def test_teacher_forcing_inputs_are_area_downsampled_partial_fhats():
    model = _tiny()
    q = model.quantize
    indices = model.encode_indices(_images())
    tf = model.teacher_forcing_inputs(indices)
    assert tf.shape == (2, 2 * 2 + 4 * 4, 8)  # L - pn_0^2 rows
    # scale 1's input: phi_0(bicubic(E[idx_0])) area-downsampled to 2x2, written out here
    h0 = q.embedding(indices[0]).reshape(2, 1, 1, 8).permute(0, 3, 1, 2)
    h0 = F.interpolate(h0, size=(4, 4), mode="bicubic")
    conv = q.quant_resi.qresi_ls[0]
    h0 = 0.5 * h0 + 0.5 * F.conv2d(h0, conv.weight, conv.bias, padding=1)
    want = F.interpolate(h0, size=(2, 2), mode="area").flatten(2).transpose(1, 2)
    assert torch.allclose(tf[:, :4], want, atol=1e-6)
    # the last scale's input is f_hat before the last scale (area to the same size: identity)
    before_last = model.indices_to_fhat(indices) - q.scale_contribution(indices[-1], 2)
    assert torch.allclose(tf[:, 4:], before_last.flatten(2).transpose(1, 2), atol=1e-6)


def test_phi_is_not_applied_at_the_last_scale():
    model = _tiny()
    q = model.quantize
    assert q.phi_of_scale == (0, 2, 3)  # (1, 2, 4): si/(SN-1) = 0, 0.5, 1
    indices = model.encode_indices(_images())
    a, b = torch.zeros_like(indices[-1]), torch.full_like(indices[-1], 5)
    delta = (model.indices_to_fhat(indices[:-1] + [a])
             - model.indices_to_fhat(indices[:-1] + [b]))
    raw = q.embedding(a) - q.embedding(b)  # (B, 16, C)
    raw = raw.transpose(1, 2).reshape(2, 8, 4, 4)
    assert torch.allclose(delta, raw, atol=1e-5)
    phi = q.quant_resi.qresi_ls[q.phi_of_scale[-1]]
    assert not torch.allclose(delta, phi(raw) - phi(torch.zeros_like(raw)), atol=1e-3)


def test_a_codebook_holding_the_last_residual_reconstructs_the_features_exactly():
    """Features with zero 2x2-block means make the coarse scales pick the zero code (phi of
    zeros is zero with zero biases); the last scale then finds each feature vector itself,
    and without phi there f_hat == f bit for bit."""
    model = _tiny()
    q = model.quantize
    g = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    f = g - F.interpolate(F.avg_pool2d(g, 2), scale_factor=2.0, mode="nearest")
    with torch.no_grad():
        for conv in q.quant_resi.qresi_ls:
            conv.bias.zero_()
        q.embedding.weight[0] = 0
        q.embedding.weight[1:33] = f.permute(0, 2, 3, 1).reshape(32, 8)
        q.embedding.weight[33:] += 10.0  # far away
    tokens = q.quantize(f)
    assert all(int(t.max()) == 0 for t in tokens.indices[:-1])
    assert torch.equal(tokens.indices[-1].flatten(), torch.arange(1, 33))
    assert torch.equal(tokens.f_hat, f)
    assert torch.equal(tokens.last_residual, f.flatten(2).transpose(1, 2))
    assert torch.equal(q.indices_to_fhat(tokens.indices), f)
    refinement = torch.randn(2, 16, 8)
    shifted = q.indices_to_fhat(tokens.indices, refinement)
    assert torch.allclose(shifted - f, refinement.transpose(1, 2).reshape(2, 8, 4, 4))


def test_checkpoint_in_the_authors_nesting_round_trips(tmp_path: Path):
    model = _tiny(seed=0)
    path = tmp_path / "vae.pth"
    torch.save({"trainer": {"vae_local": model.state_dict()}}, path)
    state = torch.load(path, weights_only=True, mmap=True)["trainer"]["vae_local"]
    fresh = MultiScaleVQVAE(**TINY)
    fresh.load_state_dict(state, strict=True)
    img = _images()
    a, b = model.encode(img), fresh.encode(img)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert torch.equal(a.f_hat, b.f_hat) and torch.equal(a.last_residual, b.last_residual)
    assert torch.equal(model.decode(a.f_hat), fresh.decode(b.f_hat))
    assert torch.equal(model.teacher_forcing_inputs(a.indices),
                       fresh.teacher_forcing_inputs(b.indices))


def test_codebook_usage_buffer_of_another_scale_count_is_ignored():
    model = _tiny()
    state = dict(model.state_dict())
    state["quantize.ema_vocab_hit_SV"] = torch.ones(7, 64)
    model.load_state_dict(state, strict=True)
    assert model.quantize.ema_vocab_hit_SV.shape == (3, 64)
