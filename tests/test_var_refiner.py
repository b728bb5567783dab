"""VARSR's diffusion refiner: checkpoint layout, schedules, sampler determinism, CFG, loss."""

from __future__ import annotations

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from varlide.models.var import refiner as refiner_mod
from varlide.models.var.refiner import (
    DiffusionRefiner,
    DiffusionSchedule,
    cosine_alpha_bar,
    cosine_betas,
    respaced_betas,
    space_timesteps,
    timestep_embedding,
)

C, D, W, DEPTH = 4, 6, 16, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, std: float = 0.3) -> DiffusionRefiner:
    """A tiny refiner with every weight random (the authors' init zeroes the output)."""
    torch.manual_seed(seed)
    model = DiffusionRefiner(token_channels=C, cond_channels=D, width=W, depth=DEPTH)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model.eval()


def _noise(n: int, steps: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(steps + 1, n, C, generator=torch.Generator().manual_seed(seed))


def test_state_dict_matches_released_layout(varsr_layout):
    want = {k: list(v) for k, v in varsr_layout["var_wo_ddp"].items()
            if k.startswith("diffloss.")}
    assert len(want) == 60
    with torch.device("meta"):
        parent = nn.Module()
        parent.diffloss = DiffusionRefiner()
    got = {k: list(v.shape) for k, v in parent.state_dict().items()}
    assert got == want


def test_cosine_schedule_identities():
    betas = cosine_betas(1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()
    abar = np.cumprod(1.0 - betas)
    ratio = [cosine_alpha_bar((i + 1) / 1000) / cosine_alpha_bar(0.0) for i in range(999)]
    np.testing.assert_allclose(abar[:-1], ratio, rtol=1e-10)
    np.testing.assert_allclose(cosine_alpha_bar(0.5), math.cos(0.508 / 1.008 * math.pi / 2) ** 2)


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    kept = space_timesteps(1000, "10")
    assert kept == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 10) == kept
    assert space_timesteps(1000, [1000]) == list(range(1000))
    assert space_timesteps(100, "ddim10") == list(range(0, 100, 10))
    full = DiffusionSchedule.cosine(1000)
    sub = DiffusionSchedule.cosine(1000, "10")
    np.testing.assert_allclose(sub.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-8)
    np.testing.assert_allclose(full.betas, cosine_betas(1000), rtol=1e-9)
    np.testing.assert_array_equal(respaced_betas(cosine_betas(1000), kept), sub.betas)
    assert list(sub.timestep_map) == kept and sub.num_timesteps == 10
    # posterior variance: beta (1 - abar_prev) / (1 - abar); its log at step 0 is step 1's
    post = sub.betas * (1 - sub.alphas_cumprod_prev) / (1 - sub.alphas_cumprod)
    np.testing.assert_allclose(sub.posterior_variance, post)
    assert sub.posterior_log_variance_clipped[0] == np.log(post[1])


def test_timestep_embedding_cos_then_sin():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 256)
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    args = t.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb[:, :128].numpy(), np.cos(args), atol=1e-4)
    np.testing.assert_allclose(emb[:, 128:].numpy(), np.sin(args), atol=1e-4)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_sample_is_deterministic_and_row_independent():
    model = _tiny()
    cond = torch.randn(5, D)
    noise = _noise(5)
    a = model.sample(cond, noise=noise)
    b = model.sample(cond, noise=noise)
    assert a.shape == (5, C) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    rows = torch.cat([model.sample(cond[i:i + 1], noise=noise[:, i:i + 1]) for i in range(5)])
    torch.testing.assert_close(rows, a, rtol=0, atol=1e-6)
    assert torch.equal(model.sample(cond, noise=lambda k: noise[k]), a)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.sample(cond, generator=g1), model.sample(cond, generator=g2))
    with pytest.raises(ValueError):
        model.sample(cond, noise=noise[:-1])


def test_sample_in_other_weight_dtypes():
    model = _tiny(std=0.1)
    cond, noise = torch.randn(3, D), _noise(3)
    ref = model.sample(cond, noise=noise)
    got = model.double().sample(cond.double(), noise=noise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_zero_output_layer_sample_has_closed_form():
    """At the authors' init the net outputs 0: eps = 0, frac = 1/2, so each step is
    x <- coef1 clip(x / sqrt(abar)) + coef2 x + exp((log beta + log post var) / 4) z."""
    torch.manual_seed(0)
    model = DiffusionRefiner(token_channels=C, cond_channels=D, width=W, depth=DEPTH)
    n, temp = 3, 0.8
    noise = _noise(n).double().numpy()
    got = model.sample(torch.randn(n, D), noise=torch.from_numpy(noise), temperature=temp)
    s = DiffusionSchedule.cosine(1000, "10")
    x = noise[0]
    for k, i in enumerate(range(9, -1, -1), start=1):
        x0 = np.clip(x * s.sqrt_recip_alphas_cumprod[i], -1, 1)
        mean = s.posterior_mean_coef1[i] * x0 + s.posterior_mean_coef2[i] * x
        log_var = 0.5 * (s.log_betas[i] + s.posterior_log_variance_clipped[i])
        x = mean + (np.exp(0.5 * log_var) * noise[k] * temp if i > 0 else 0.0)
    np.testing.assert_allclose(got.numpy(), x * 0.6, rtol=1e-5, atol=1e-6)


def test_cfg_follows_the_authors_formula():
    model = _tiny()
    cond, uncond = torch.randn(4, D), torch.randn(4, D)
    noise = _noise(4)
    plain = model.sample(cond, noise=noise)
    # cfg == 1 is the conditional sampler (uncond ignored); (1 + 0) eps_c - 0 eps_u == eps_c
    assert torch.equal(model.sample(cond, cfg=1.0, uncond=uncond, noise=noise), plain)
    torch.testing.assert_close(model.sample(cond, cfg=0.0, uncond=uncond, noise=noise), plain)
    # guiding towards the same condition changes nothing
    torch.testing.assert_close(model.sample(cond, cfg=6.0, uncond=cond, noise=noise), plain,
                               rtol=1e-5, atol=1e-5)
    guided = model.sample(cond, cfg=6.0, uncond=uncond, noise=noise)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    with pytest.raises(ValueError):
        model.sample(cond, cfg=6.0, noise=noise)


def test_loss_is_finite_and_reaches_every_parameter():
    model = _tiny(std=0.05).train()
    target, cond = torch.randn(8, C) * 0.3, torch.randn(8, D, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    loss = model.loss(target, cond, generator=g)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    same = model.loss(target, cond, generator=torch.Generator().manual_seed(3))
    assert torch.equal(same, loss.detach())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.net.grad_checkpoint = True
    model.loss(target, cond, generator=torch.Generator().manual_seed(3)).backward()
    for g_plain, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g_plain)


def test_loss_terms_at_zero_output():
    """eps = 0: MSE is mean(noise^2); the VLB of the mid variance is finite at t = 0 and t > 0."""
    torch.manual_seed(0)
    model = DiffusionRefiner(token_channels=C, cond_channels=D, width=W, depth=DEPTH)
    noise = torch.randn(3, C)
    t = torch.tensor([0, 500, 999])
    mse, vb = model.loss_terms(torch.randn(3, C), torch.randn(3, D), t=t, noise=noise)
    torch.testing.assert_close(mse, (noise**2).mean(dim=1))
    assert torch.isfinite(vb).all() and (vb >= 0).all()


def test_no_hard_coded_device():
    tree = ast.parse(inspect.getsource(refiner_mod))
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "cuda" not in attrs
