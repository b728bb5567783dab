"""The VAR backbone of issue 13 (``varlide-var``): VARSR's modules in pure torch.

The modules (``vqvae``, ``transformer``, ``rope``, ``refiner``) do no I/O; the authors'
files are opened in one place, ``checkpoints`` (``files`` lists them as data).
"""

from varlide.models.var.vqvae import RELEASED_PATCH_NUMS, MultiScaleTokens, MultiScaleVQVAE

__all__ = ["RELEASED_PATCH_NUMS", "MultiScaleTokens", "MultiScaleVQVAE"]
