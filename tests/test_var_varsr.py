"""VARSR assembled: flat checkpoint layout, authors' checkpoint nesting, CFG inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from varlide.models.var.varsr import (
    VARSRModel,
    VARSRPipeline,
    adain_colour_fix,
    load_authors_checkpoint,
    restore,
    sample_top_k_top_p,
)
from varlide.models.var.vqvae import MultiScaleVQVAE

PATCH_NUMS = (1, 2, 4)
TINY_VAR = dict(depth=2, width=64, heads=2, vocab_size=32, cvae=8, patch_nums=PATCH_NUMS,
                prefix_side=4, cond_channels=(8, 16), refiner_width=16, refiner_depth=2)
TINY_VAE = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=PATCH_NUMS)
SIDE = 8  # VAE: 4 tokens x 2; transformer prefix: 8 / 2 = 4
N_LAST = PATCH_NUMS[-1] ** 2
STEPS = 10  # the refiner's respaced chain


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(module: torch.nn.Module, std: float) -> torch.nn.Module:
    with torch.no_grad():  # the authors' inits zero the refiner's output and AdaLN layers
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def _tiny(seed: int = 0) -> tuple[VARSRModel, MultiScaleVQVAE]:
    torch.manual_seed(seed)
    model = _perturbed(VARSRModel(**TINY_VAR), 0.2)
    vae = _perturbed(MultiScaleVQVAE(**TINY_VAE), 0.1)
    return model, vae


def _lr(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _noise(b: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS + 1, b * N_LAST, TINY_VAR["cvae"], generator=g)


def test_full_size_state_dict_is_the_flat_var_wo_ddp_layout(varsr_layout):
    expected = varsr_layout["var_wo_ddp"]
    with torch.device("meta"):
        model = VARSRModel()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    assert got == expected and len(got) == 405
    assert sum(k.startswith("diffloss.") for k in got) == 60


def test_authors_checkpoint_nesting_loads_strict_and_reproduces(tmp_path: Path):
    model, vae = _tiny(0)
    torch.save({"trainer": {"var_wo_ddp": model.state_dict()}}, tmp_path / "VARSR.pth")
    torch.save({"trainer": {"vae_local": vae.state_dict()}}, tmp_path / "VQVAE.pth")
    lr, noise = _lr(), _noise(2)
    want = restore(model, vae, lr, noise=noise)

    other, other_vae = _tiny(5)
    assert not torch.equal(restore(other, other_vae, lr, noise=noise), want)
    load_authors_checkpoint(other, tmp_path / "VARSR.pth", "var_wo_ddp")
    load_authors_checkpoint(other_vae, tmp_path / "VQVAE.pth")  # key inferred: vae_local
    assert torch.equal(restore(other, other_vae, lr, noise=noise), want)

    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("diffloss.")}
    torch.save({"trainer": {"var_wo_ddp": bad}}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_authors_checkpoint(other, tmp_path / "partial.pth")


def test_plain_and_safetensors_files_load(tmp_path: Path):
    model, vae = _tiny(0)
    lr, noise = _lr(1), _noise(1)
    want = restore(model, vae, lr, noise=noise)
    torch.save(model.state_dict(), tmp_path / "var.pt")
    other, _ = _tiny(3)
    load_authors_checkpoint(other, tmp_path / "var.pt")
    assert torch.equal(restore(other, vae, lr, noise=noise), want)

    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    _, other_vae = _tiny(4)
    load_authors_checkpoint(other_vae, tmp_path / "vae.safetensors")
    assert torch.equal(restore(model, other_vae, lr, noise=noise), want)


def test_loader_refuses_pickled_objects(tmp_path: Path):
    model, _ = _tiny(0)
    torch.save({"trainer": {"var_wo_ddp": model.state_dict(), "args": Path("x")}},
               tmp_path / "pickled.pth")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        load_authors_checkpoint(model, tmp_path / "pickled.pth")


def test_output_shape_range_and_seeding():
    model, vae = _tiny()
    lr = _lr(2)
    out = restore(model, vae, lr, seed=7)
    assert out.shape == (2, 3, SIDE, SIDE) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(restore(model, vae, lr, seed=7), out)
    assert torch.equal(restore(model, vae, lr, seed=torch.Generator().manual_seed(7)), out)

    def sampled(seed: int) -> list[torch.Tensor]:
        return restore(model, vae, lr, top_k=16, top_p=0.0, seed=seed, refine=False,
                       return_indices=True)[1]

    first = sampled(0)
    assert any(any(not torch.equal(a, b) for a, b in zip(first, sampled(s), strict=True))
               for s in range(1, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, sampled(0), strict=True))


def _conditional_only(model: VARSRModel, vae: MultiScaleVQVAE, lr01: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """A reference run without CFG: label 0 alone, greedy, unguided refiner."""
    b, quant = lr01.shape[0], vae.quantize
    out = model.prefill(lr01 * 2 - 1, torch.zeros(b, dtype=torch.long))
    f_hat, indices = torch.zeros(b, 8, 4, 4), []
    for si in range(len(PATCH_NUMS)):
        if si > 0:
            out = model.step(si, quant.next_scale_input(f_hat, si - 1))
        indices.append(out.logits.argmax(-1))
        f_hat = f_hat + quant.scale_contribution(indices[-1], si)
    z = model.refiner_condition(out.hidden, quant.embedding(indices[-1])).reshape(b * N_LAST, -1)
    res = model.diffloss.sample(z, cfg=1.0, noise=noise).view(b, N_LAST, -1)
    return adain_colour_fix(vae.fhat_to_img01(vae.indices_to_fhat(indices, res)), lr01)


@torch.no_grad()
def test_cfg_zero_is_the_conditional_branch_alone():
    model, vae = _tiny()
    lr, noise = _lr(2), _noise(2)
    got = restore(model, vae, lr, cfg=0.0, noise=noise)
    torch.testing.assert_close(got, _conditional_only(model, vae, lr, noise),
                               atol=1e-5, rtol=0)
    model.class_emb.weight[model.num_classes - 1].add_(3.0)  # the uncond half's label
    torch.testing.assert_close(restore(model, vae, lr, cfg=0.0, noise=noise), got,
                               atol=1e-5, rtol=0)
    assert not torch.allclose(restore(model, vae, lr, cfg=6.0, noise=noise),
                              restore(model, vae, lr, cfg=0.0, noise=noise), atol=1e-3)


def test_batch_of_two_equals_each_image_alone():
    model, vae = _tiny()
    lr, noise = _lr(2), _noise(2)
    both, idx = restore(model, vae, lr, noise=noise, return_indices=True)
    for i in range(2):
        alone, idx_i = restore(model, vae, lr[i:i + 1], return_indices=True,
                               noise=noise[:, i * N_LAST:(i + 1) * N_LAST])
        # float noise only (GEMM/conv blocking differs with the batch); AdaIN amplifies it
        torch.testing.assert_close(alone, both[i:i + 1], atol=1e-4, rtol=0)
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(idx, idx_i, strict=True))


def test_indices_and_unrefined_decode():
    model, vae = _tiny()
    lr = _lr(2)
    out, idx = restore(model, vae, lr, refine=False, return_indices=True)
    assert len(idx) == len(PATCH_NUMS)
    for pn, t in zip(PATCH_NUMS, idx, strict=True):
        assert t.dtype == torch.long and t.shape == (2, pn * pn)
        assert t.min() >= 0 and t.max() < TINY_VAR["vocab_size"]
    with torch.no_grad():
        plain = vae.fhat_to_img01(vae.indices_to_fhat(idx))
    # f_hat is bit-equal; the decoder's convs round differently on indices_to_fhat's layout
    torch.testing.assert_close(out, adain_colour_fix(plain, lr), atol=1e-4, rtol=0)
    raw = restore(model, vae, lr, refine=False, colour_fix=False)
    torch.testing.assert_close(raw, plain, atol=2e-5, rtol=0)
    refined = restore(model, vae, lr, noise=_noise(2), colour_fix=False)
    assert not torch.allclose(refined, raw, atol=1e-4)


def test_colour_fix_takes_the_lr_statistics():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.2
    style = torch.rand(2, 3, 16, 16, generator=g) * 0.3 + 0.35
    out = adain_colour_fix(content, style, clamp=False)
    eps = 1e-5
    c_var, s_var = content.flatten(2).var(2), style.flatten(2).var(2)
    torch.testing.assert_close(out.flatten(2).mean(2), style.flatten(2).mean(2),
                               atol=1e-6, rtol=0)
    # theirs divides by sqrt(var + eps) on both sides: var_out = var_c/(var_c+eps)*(var_s+eps)
    torch.testing.assert_close(out.flatten(2).var(2), c_var / (c_var + eps) * (s_var + eps),
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.flatten(2).std(2), style.flatten(2).std(2),
                               atol=1e-4, rtol=1e-3)
    assert torch.equal(adain_colour_fix(content, style), out.clamp(0, 1))


def test_sampler_top_k_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 32, generator=g)
    greedy = sample_top_k_top_p(logits, top_k=1, top_p=0.75, generator=g)
    assert torch.equal(greedy, logits.argmax(-1))
    # one dominant logit: top_p keeps it alone
    peaked = torch.zeros(1, 3, 8)
    peaked[..., 2] = 10.0
    assert torch.equal(sample_top_k_top_p(peaked, 0, 0.5, g), torch.full((1, 3), 2))
    draws = torch.cat([sample_top_k_top_p(logits, 3, 0.0, g) for _ in range(20)])
    allowed = logits.topk(3, dim=-1).indices
    assert (draws.view(20, 2, 5, 1) == allowed.unsqueeze(0)).any(-1).all()


def test_pipeline_and_shape_checks():
    model, vae = _tiny()
    pipe = VARSRPipeline(model, vae, refine=False)
    lr = _lr(3)
    torch.testing.assert_close(torch.cat(list(pipe.batches(lr, 2))), pipe(lr), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="LR images"):
        restore(model, vae, torch.rand(1, 3, SIDE * 2, SIDE * 2))
    assert model._state is None  # no KV cache left behind


def test_autocast_argument_keeps_sampling_in_fp32():
    model, vae = _tiny()
    lr = _lr(2)
    out, idx = restore(model, vae, lr, amp_dtype=torch.bfloat16, seed=3, return_indices=True)
    assert out.dtype == torch.float32 and out.shape == (2, 3, SIDE, SIDE)
    assert 0 <= out.min() and out.max() <= 1 and all(t.dtype == torch.long for t in idx)
    with pytest.raises(ValueError, match="amp_dtype"):
        restore(model, vae, lr, amp_dtype="fp16")
