"""The prior interface: a scorer that gives every image a visibility v and a blur b in [0, 1].

v: higher = better lit / more visible. b: higher = blurrier. Scores feed learned modules,
so a backend's scale is part of an enhancer's contract (DESIGN.md, "Priors feed learned
modules"); ``backend`` and ``model`` are recorded in every row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from varlide.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class PriorScores:
    visibility: torch.Tensor  # (B,) float32 in [0, 1]
    blur: torch.Tensor  # (B,) float32 in [0, 1]
    local: torch.Tensor | None = None  # (B, K, G, G) in [0, 1]: local maps, when asked for


class Prior:
    """Base class. Subclasses set ``backend``/``model`` and implement ``score``."""

    backend: str = ""
    model: str | None = None

    def score(self, images: torch.Tensor) -> PriorScores:
        """Score a batch ``(B, 3, H, W)`` float in [0, 1] on the prior's device."""
        raise NotImplementedError

    def score_with_maps(self, images: torch.Tensor) -> PriorScores:
        """``score`` plus ``local`` maps: backends registered ``local=True`` implement
        ``score_local``; asking another one is an error (``prior_local`` is refused before
        a run starts for them)."""
        local = getattr(self, "score_local", None)
        if local is None:
            raise ValueError(f"prior {self.backend} has no local maps (prior_local)")
        scores = self.score(images)
        scores.local = local(images)
        return scores


class ModelCache:
    """Models built once per process and key (device, precision ...), thread-safe: a worker
    process loads each model once, however many shards it runs."""

    def __init__(self) -> None:
        self._models: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], Any], what: str) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = build()
                log.info("%s: loaded", what)
            return self._models[key]


PRIORS: Registry[Prior] = Registry("prior")


def create_prior(name: str, device: str | torch.device = "cpu", **kwargs) -> Prior:
    """Build a registered prior backend (``analytic``, later ``clip``)."""
    import varlide.priors  # noqa: F401  (registers the built-in backends)

    return PRIORS.create(name, device=device, **kwargs)
