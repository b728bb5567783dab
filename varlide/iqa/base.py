"""Quality measures: one registry, each measure with its metadata (pyiqa's manner).

Callers never guess a direction or a range: ``metric_info(name)`` says whether lower is
better, the value range, and whether a reference image is needed.

Names resolve in order: our registry (analytic measures, and ``piqe``/``psnr``/``ssim``
registered with their documented defaults), then any other pyiqa metric name, built
through ``pyiqa.create_metric`` with the direction and range from pyiqa's own table, so a
learned pyiqa metric (niqe, brisque, musiq, maniqa, clipiqa, lpips ...) needs no code here.
Its weight files are managed inputs (``metric_weights``, ``varlide.weights``): offline, a
missing one fails when the measure is built, and before a run starts, naming the file and
``varlide weights pull``. Our names win on a clash (``entropy`` is ours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varlide.registry import Registry, UnknownNameError


@dataclass(frozen=True)
class MetricInfo:
    name: str
    lower_better: bool | None  # None: no preferred direction (e.g. brightness)
    value_range: tuple[float, float] | None  # math.inf for an open end; None: not documented
    needs_reference: bool = False
    source: str = "varlide"  # 'varlide' (analytic) or 'pyiqa'
    description: str = ""


class Metric:
    """Base class: ``info`` plus ``__call__(images, reference=None) -> (B,) float64``.

    ``images`` (and ``reference``) are ``(B, 3, H, W)`` float in [0, 1]; the result is on
    the device the measure ran on. No-reference measures ignore ``reference``.
    """

    info: MetricInfo
    # Peak working bytes per pixel of one call (measured, ``benchmarks/memory.py``): the
    # engine calls a measure on sub-batches that fit its workspace (``measure``). pyiqa's
    # own implementations are costly (its PIQE ~390 B/px); ours override it.
    bytes_per_pixel: int = 400

    @property
    def capped(self) -> bool:
        """Whether ``iqa_max_side`` applies (the measure sees an area-downscaled copy):
        pyiqa's measures and our ``piqe`` (which overrides this); the analytic ones not."""
        return self.info.source == "pyiqa"

    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


METRICS: Registry[Metric] = Registry("metric")


def _pyiqa():
    from varlide.iqa import pyiqa_metrics

    return pyiqa_metrics


def _unknown(name: str) -> UnknownNameError:
    import difflib

    ours = METRICS.names()
    theirs = _pyiqa().pyiqa_names()
    close = difflib.get_close_matches(name, sorted(set(ours + theirs)), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(
        f"unknown metric {name!r}; known: {', '.join(ours)}, or any of pyiqa's "
        f"{len(theirs)} metric names (pyiqa.list_models()){hint}"
    )


def create_metric(name: str, device: str | torch.device = "cpu", **kwargs) -> Metric:
    """Build a measure on ``device``: a registered one first, else any pyiqa metric by name.

    Extra ``kwargs`` go to the factory (for a pyiqa metric: to ``pyiqa.create_metric``).
    """
    import varlide.iqa  # noqa: F401  (registers the built-in measures)

    if name in METRICS:
        return METRICS.create(name, device=device, **kwargs)
    if name in _pyiqa().pyiqa_names():
        return _pyiqa().PyiqaMetric(name, device=device, **kwargs)
    raise _unknown(name)


def metric_info(name: str) -> MetricInfo:
    """Metadata of a measure without building it (pyiqa's table is read, pyiqa not imported)."""
    import varlide.iqa  # noqa: F401

    if name in METRICS:
        return METRICS.get(name).info  # factories carry ``info`` as an attribute
    if name in _pyiqa().pyiqa_names():
        return _pyiqa().pyiqa_info(name)
    raise _unknown(name)


def metric_weights(name: str):
    """The weight files (``varlide.weights.WeightFile``) a measure needs: () for ours and the
    weight-free pyiqa ones, None for a pyiqa metric whose files are not catalogued."""
    import varlide.iqa  # noqa: F401
    from varlide.iqa.files import metric_files

    if name in METRICS:
        return metric_files(name) or ()  # piqe/psnr/ssim: weight-free
    if name in _pyiqa().pyiqa_names():
        return metric_files(name)
    raise _unknown(name)
