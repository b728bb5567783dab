"""Quality measures: one registry, each measure with its metadata (pyiqa's manner).

Callers never guess a direction or a range: ``metric_info(name)`` says whether lower is
better, the value range, and whether a reference image is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varlide.registry import Registry


@dataclass(frozen=True)
class MetricInfo:
    name: str
    lower_better: bool | None  # None: no preferred direction (e.g. brightness)
    value_range: tuple[float, float] | None  # None: unbounded / not documented
    needs_reference: bool = False
    source: str = "varlide"  # 'varlide' (analytic) or 'pyiqa'
    description: str = ""


class Metric:
    """Base class: ``info`` plus ``__call__(images, reference=None) -> (B,) float64``."""

    info: MetricInfo

    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


METRICS: Registry[Metric] = Registry("metric")


def create_metric(name: str, device: str | torch.device = "cpu", **kwargs) -> Metric:
    """Build a registered measure on ``device``."""
    import varlide.iqa  # noqa: F401  (registers the built-in measures)

    return METRICS.create(name, device=device, **kwargs)


def metric_info(name: str) -> MetricInfo:
    """Metadata of a measure without building it."""
    import varlide.iqa  # noqa: F401

    return METRICS.get(name).info  # factories carry ``info`` as an attribute
