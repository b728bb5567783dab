"""Pure torch enhancer modules and their registry (``create_enhancer``)."""

from varlide.models import (  # noqa: F401  (register enhancers)
    classic,
    restorer,
    varlide_lite,
    varlide_var,
    zero_dce,
)
from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, create_enhancer

__all__ = ["ENHANCERS", "EnhanceResult", "Enhancer", "create_enhancer"]
