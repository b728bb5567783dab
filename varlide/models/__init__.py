"""Pure torch enhancer modules and their registry (``create_enhancer``)."""

from varlide.models import classic  # noqa: F401  (registers classic-curve)
from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, create_enhancer

__all__ = ["ENHANCERS", "EnhanceResult", "Enhancer", "create_enhancer"]
