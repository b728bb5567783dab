"""Prior backends (visibility / blur scorers) and their registry (``create_prior``)."""

from varlide.priors import analytic, clip, qinstruct, qrealign  # noqa: F401  (register them)
from varlide.priors.base import PRIORS, Prior, PriorScores, create_prior

__all__ = ["PRIORS", "Prior", "PriorScores", "create_prior"]
