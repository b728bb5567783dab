"""Helpers the VAR transformer tests share (SA-RoPE and SF-RoPE drive it the same way)."""

from __future__ import annotations

import torch


def transformer_inputs(model, side: int, b: int = 2, seed: int = 1):
    """An LR image in [-1, 1] and random teacher-forcing input maps for ``model``."""
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, 3, side, side, generator=g) * 2 - 1
    x = torch.randn(b, model.L - 1, model.cvae, generator=g)
    return lr, x


def cached_logits(model, lr: torch.Tensor, label: torch.Tensor,
                  x: torch.Tensor) -> list[torch.Tensor]:
    """Per-scale logits through the KV-cached path fed the same input maps."""
    out = [model.prefill(lr, label).logits]
    first = model.first_l
    for si in range(1, len(model.patch_nums)):
        a, b = model.scale_bounds(si)
        out.append(model.step(si, x[:, a - first:b - first]).logits)
    return out
