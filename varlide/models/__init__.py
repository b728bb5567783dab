"""Pure torch enhancer modules and their registry (``create_enhancer``)."""

from varlide.models import classic, restorer, varlide_lite, zero_dce  # noqa: F401  (register enhancers)
from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, create_enhancer

__all__ = ["ENHANCERS", "EnhanceResult", "Enhancer", "create_enhancer"]
