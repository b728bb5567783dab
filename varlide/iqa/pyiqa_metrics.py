"""pyiqa metrics behind our registry: ``psnr``, ``ssim``, and any other pyiqa name.

Direction and range come from pyiqa's own table (``pyiqa.default_model_configs``, the
source of ``InferenceModel.lower_better`` / ``.score_range``: ``lower_better`` defaults to
False there, ``metric_mode == 'FR'`` means a reference is needed). That table is read from
its file without importing pyiqa (importing pyiqa costs ~8 s of CPU), so ``metric_info``
stays cheap; pyiqa itself is imported when a metric is built. pyiqa's ranges are strings
(``'0, 100'``, ``'~0, ~40'``; ``~`` = approximate, a bare ``~`` = open end): they become
``(lo, hi)`` with ``math.inf`` for an open end, None when not a plain pair.

Defaults (pyiqa 0.1.16), as documented:
- ``piqe`` is ours (``varlide.iqa.piqe``: pyiqa's definition in bands, equal to it to
  1e-6); pyiqa's own stays reachable as ``PyiqaMetric('piqe')``, the tests' reference.
  Its cost on CPU (2-core dev box, torch 2.14): 110-210 ms per 1280x720 image when the box
  is quiet, ~140 bytes per pixel.
- ``psnr``: ``test_y_channel=False``, i.e. over all three RGB channels, data range 1.
  pyiqa adds eps = 1e-8 to the MSE, so identical images give exactly 80 dB (finite), and
  [0, 80] is the exact range for inputs in [0, 1] (pyiqa's table says '~0, ~40', typical).
- ``ssim``: ``test_y_channel=True`` (Y of YIQ = Rec.601 luma, like the MATLAB reference),
  ``downsample=False``, Gaussian window 11 / sigma 1.5; range [0, 1], higher is better.
Any pyiqa option may be passed through ``create_metric(name, **kwargs)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import sys
from pathlib import Path

import torch

from varlide.iqa.base import METRICS, Metric, MetricInfo

# Where our documented facts are exact rather than pyiqa's rough estimate.
RANGE_OVERRIDES: dict[str, tuple[float, float]] = {"psnr": (0.0, 80.0)}
DESCRIPTIONS = {
    "piqe": "PIQE (Venkatanath et al. 2015), no reference, pyiqa (MATLAB-exact)",
    "psnr": "PSNR over RGB (pyiqa test_y_channel=False), dB; identical images -> 80 dB",
    "ssim": "SSIM on Rec.601 luma (pyiqa test_y_channel=True, downsample=False)",
}


@functools.cache
def _configs() -> dict:
    """pyiqa's DEFAULT_CONFIGS, loaded from its file without importing the pyiqa package."""
    mod = sys.modules.get("pyiqa.default_model_configs")
    if mod is None:
        spec = importlib.util.find_spec("pyiqa")
        if spec is None or not spec.submodule_search_locations:
            return {}  # pyiqa not installed: only our own measures exist
        path = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
        if path.is_file():  # a module of dict literals (imports only OrderedDict)
            file_spec = importlib.util.spec_from_file_location("_varlide_pyiqa_configs", path)
            mod = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(mod)
        else:  # layout changed: pay the import
            import pyiqa.default_model_configs as mod
    return dict(mod.DEFAULT_CONFIGS)


def pyiqa_names() -> list[str]:
    """Every metric name pyiqa knows (``pyiqa.list_models()``), without importing pyiqa."""
    return sorted(_configs())


def parse_score_range(text: object) -> tuple[float, float] | None:
    """pyiqa's ``score_range`` string -> ``(lo, hi)``; ``~`` alone = open end; else None."""
    if not isinstance(text, str):
        return None
    parts = text.split(",")
    if len(parts) != 2:
        return None
    ends = []
    for part, open_end in zip(parts, (-math.inf, math.inf), strict=True):
        p = part.strip().lstrip("~").strip()
        try:
            ends.append(open_end if p == "" else float(p))
        except ValueError:
            return None
    return (ends[0], ends[1])


def pyiqa_info(name: str) -> MetricInfo:
    """MetricInfo of a pyiqa metric from pyiqa's table (KeyError if pyiqa lacks it)."""
    cfg = _configs()[name]
    rng = RANGE_OVERRIDES.get(name, parse_score_range(cfg.get("score_range")))
    desc = DESCRIPTIONS.get(name, f"pyiqa {name} (pyiqa range: {cfg.get('score_range')})")
    return MetricInfo(
        name=name,
        lower_better=bool(cfg.get("lower_better", False)),
        value_range=rng,
        needs_reference=cfg.get("metric_mode") == "FR",
        source="pyiqa",
        description=desc,
    )


# Peak working bytes per pixel of one call on one image (benchmarks/memory.py, 1280x720):
# what the engine's memory budget counts for a measure that sees whole frames.
BYTES_PER_PIXEL = {"piqe": 140}


class PyiqaMetric(Metric):
    """One pyiqa model, created once, scoring batches ``(B, 3, H, W)`` in [0, 1].

    Weights: the files ``varlide.iqa.files.PYIQA_FILES`` lists for the metric must be where
    pyiqa / torchvision / timm look for them; offline (the default) a missing one is a
    ``WeightsMissingError`` naming it and ``varlide weights pull``, raised before pyiqa is
    even imported, and any download pyiqa still attempts is refused the same way.
    """

    def __init__(self, name: str, device: str | torch.device = "cpu", **kwargs) -> None:
        from varlide import weights
        from varlide.iqa.files import metric_files

        self.info = pyiqa_info(name)
        self.device = torch.device(device)
        self.bytes_per_pixel = BYTES_PER_PIXEL.get(name, Metric.bytes_per_pixel)
        online = weights.is_online()
        if not online:
            weights.ensure_files(metric_files(name) or (), f"metric {name}")
        import pyiqa

        guard = (contextlib.nullcontext() if online
                 else weights.blocked_downloads(f"pyiqa metric {name!r}"))
        try:
            with guard:
                self.net = pyiqa.create_metric(name, device=self.device, as_loss=False,
                                               **kwargs)
        except weights.WeightsMissingError:
            raise
        except OSError as e:  # URLError / offline hub: weights missing from the cache
            from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

            raise weights.WeightsMissingError(
                f"pyiqa metric {name!r} needs weights that are not in the local cache "
                f"({DEFAULT_CACHE_DIR}, the Hugging Face hub cache or torch hub checkpoints) "
                f"and none can be downloaded here ({type(e).__name__}: {e}).\n"
                + (weights.fetch_hint() if metric_files(name) is not None else
                   f"Its files are not catalogued in varlide.iqa.files.PYIQA_FILES: build it once "
                   f"online (`python -c \"import pyiqa; pyiqa.create_metric('{name}')\"`) and "
                   f"copy {DEFAULT_CACHE_DIR} and the Hugging Face hub cache to this machine, "
                   "or add its files to PYIQA_FILES so `varlide weights` manages them.")
            ) from e
        if bool(self.net.lower_better) != self.info.lower_better:  # table and model disagree
            raise RuntimeError(f"pyiqa {name}: lower_better differs between table and model")

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        x = images.to(self.device).float()
        if self.info.needs_reference:
            if reference is None:
                raise ValueError(f"metric {self.info.name!r} needs a reference image")
            out = self.net(x, reference.to(self.device).float())
        else:
            out = self.net(x)
        if isinstance(out, tuple | list):
            out = out[0]
        return torch.as_tensor(out).reshape(images.shape[0]).double()


class _PyiqaFactory:
    """Registered factory of a named pyiqa metric; ``info`` is read lazily from pyiqa."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def info(self) -> MetricInfo:
        return pyiqa_info(self.name)

    def __call__(self, device: str | torch.device = "cpu", **kwargs) -> PyiqaMetric:
        return PyiqaMetric(self.name, device=device, **kwargs)


for _name in ("psnr", "ssim"):
    METRICS.register(_name)(_PyiqaFactory(_name))


