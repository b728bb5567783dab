"""The backbone slot between the curve (VICM) and VGPM: a registry of restoration modules.

A backbone is an ``nn.Module`` with ``forward(image, source, sigma_in=None)`` (the curve
output, the enhancer's input, an optional noise estimate), ``prepare(source, rows)``,
``tag()`` (a short name for the enhancer's version string, "" when empty) and ``halo``
(rows of context a band needs). A new backbone is one module that registers a factory
here (``@BACKBONES.register("name")``, taking the slot's options as keywords) and one
import in ``varlide/models/__init__.py``; enhancers build it by name with
:func:`build_backbone`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from varlide.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


class IdentityBackbone(nn.Module):
    """The empty slot: returns the curve output unchanged."""

    halo = 0

    def tag(self) -> str:
        return ""

    def prepare(self, source: torch.Tensor, rows: int | None = None) -> None:
        return None

    def forward(self, image: torch.Tensor, source: torch.Tensor,
                sigma_in: torch.Tensor | None = None) -> torch.Tensor:
        return image


@BACKBONES.register("identity")
def _identity(**_: object) -> IdentityBackbone:
    return IdentityBackbone()


def backbone_names() -> list[str]:
    """Every registered backbone (the built-in ones registered first)."""
    import varlide.models.denoise  # noqa: F401  (registers 'denoise')
    import varlide.models.nlm  # noqa: F401  (registers 'nlm')

    return BACKBONES.names()


def build_backbone(name: str, **options: Any) -> nn.Module:
    """The module for a backbone-slot name (:func:`backbone_names`), given the slot's
    options (a factory takes the keywords it knows and ignores the rest)."""
    if name not in backbone_names():
        raise ValueError(f"backbone must be one of {tuple(backbone_names())}, got {name!r}")
    return BACKBONES.create(name, **options)
