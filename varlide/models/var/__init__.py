"""The VAR backbone for issue 13 (``varlide-var``): VARSR's modules, pure torch, no I/O.

Weights are loaded by the caller; nothing here reads files.
"""

from varlide.models.var.vqvae import RELEASED_PATCH_NUMS, MultiScaleTokens, MultiScaleVQVAE

__all__ = ["RELEASED_PATCH_NUMS", "MultiScaleTokens", "MultiScaleVQVAE"]
