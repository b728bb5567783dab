"""The harness: every enhancer on every set, per image, then the mean/std summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from varlide.evaluation.sets import (
    ALL,
    BANDS,
    FULL_PATH,
    INPUT,
    PAIRED_METRICS,
    TARGET_BAND,
    UNPAIRED_METRICS,
    EvalItem,
    EvalSet,
    brightness_band,
)
from varlide.evaluation.ssim import SeparableSSIM
from varlide.iqa.base import Metric, create_metric
from varlide.iqa.measure import measure as measure_metric

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- measures


def _build_metric(name: str, device: torch.device, ssim_impl: str) -> Metric:
    if name == "ssim" and ssim_impl == "separable":
        return SeparableSSIM(device)
    return create_metric(name, device=device)


def _batches(
    items: Sequence[EvalItem], batch_size: int
) -> Iterator[list[tuple[EvalItem, np.ndarray, np.ndarray | None]]]:
    """Loaded items grouped by size, at most ``batch_size`` each; at most ``2 * batch_size``
    images held while waiting for a full batch (then the largest group goes)."""
    buckets: dict[tuple, list] = {}
    held = 0
    for item in items:
        try:
            x, ref = item.load()
        except Exception as exc:  # an unreadable image is skipped, loudly, not fatal
            log.warning("evaluation: skipping %s (%s: %s)", item.id, type(exc).__name__, exc)
            continue
        key = x.shape
        buckets.setdefault(key, []).append((item, x, ref))
        held += 1
        if len(buckets[key]) >= batch_size:
            held -= len(buckets[key])
            yield buckets.pop(key)
        elif held >= 2 * batch_size:
            big = max(buckets, key=lambda k: len(buckets[k]))
            held -= len(buckets[big])
            yield buckets.pop(big)
    yield from buckets.values()


def _resolve(enhancers: Mapping[str, Any], device: torch.device, include_input: bool):
    out: dict[str, Any] = {}
    if include_input and not any(e is None for e in enhancers.values()):
        out[INPUT] = None
    for name, e in enhancers.items():
        out[name] = load_enhancer(e, device=device) if isinstance(e, str) else e
    return out


def full_path(model: Any) -> Any:
    """``model`` with routing off (:data:`FULL_PATH`: never skip, VGPM always) when it has
    routing, so its row measures the model, not the router; others are returned as is."""
    if model is not None and hasattr(model, "skip_visibility") and hasattr(model, "full_blur"):
        model.skip_visibility = FULL_PATH["skip_visibility"]
        model.full_blur = FULL_PATH["full_blur"]
    return model


def load_enhancer(name: str, weights: str | None = None,
                  device: str | torch.device = "cpu") -> Any:
    """A registered enhancer for evaluation: ``weights`` (a folder / URI / ``models:/...``;
    None: its shipped weights) on ``device``, routing off (:func:`full_path`)."""
    from varlide.models.base import create_enhancer
    from varlide.resolver import local_weights

    return full_path(create_enhancer(name, weights=local_weights(weights), device=device))


def measure(
    enhancers: Mapping[str, Any],
    sets: Sequence[EvalSet],
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    *,
    prior: str = "analytic",
    paired_metrics: Sequence[str] = PAIRED_METRICS,
    unpaired_metrics: Sequence[str] = UNPAIRED_METRICS,
    iqa_max_side: int | None = None,
    include_input: bool = True,
    ssim_impl: str = "separable",
    progress: Callable[[int], Any] | None = None,
) -> pd.DataFrame:
    """Per-image measures: one row per (set, image, enhancer).

    ``enhancers``: display name -> an :class:`~varlide.models.base.Enhancer` (built on
    ``device``), a registered name (built here with its default weights), or None (the
    identity, reported as given; ``'input'`` is added first when no None is given and
    ``include_input``). Every set's images are loaded once, in batches of one size, and
    every enhancer runs on each batch. ``iqa_max_side``: pyiqa measures see images
    area-downscaled to this long side (as the pipeline's ``iqa_max_side``). ``progress`` is
    called with the number of images of each finished batch.

    Columns: ``set, kind, image, enhancer, band`` (of the input's mean luma),
    ``input_brightness, visibility, blur, route, n_iter, phase_strength, enhance_ms``, then
    one column per measure, ``in_band`` (unpaired sets) and ``ref_brightness`` (paired).
    """
    if ssim_impl not in ("separable", "pyiqa"):
        raise ValueError(f"ssim_impl: expected 'separable' or 'pyiqa', got {ssim_impl!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    from varlide.priors.base import create_prior

    dev = torch.device(device)
    models = _resolve(enhancers, dev, include_input)
    scorer = create_prior(prior, device=dev)
    names = list(dict.fromkeys(
        [*(paired_metrics if any(s.paired for s in sets) else ()),
         *(unpaired_metrics if any(not s.paired for s in sets) else ()), "brightness"]))
    metrics = {n: _build_metric(n, dev, ssim_impl) for n in names}
    rows: list[dict[str, Any]] = []
    for eset in sets:
        wanted = list(paired_metrics if eset.paired else unpaired_metrics)
        for batch in _batches(eset.items, batch_size):
            rows.extend(_measure_batch(eset, batch, models, scorer, metrics, wanted, dev,
                                       iqa_max_side))
            if progress is not None:
                progress(len(batch))
    return pd.DataFrame(rows)


def _values(metric: Metric, images: torch.Tensor, ref: torch.Tensor | None,
            max_side: int | None) -> list[float]:
    """The engine's own measuring path (size cap, CPU strips), NaN where not finite."""
    return [float("nan") if v is None else v for v in measure_metric(metric, images, max_side, ref)]


@torch.inference_mode()
def _measure_batch(eset, batch, models, scorer, metrics, wanted, dev, max_side):
    n = len(batch)
    images = torch.from_numpy(np.stack([x for _, x, _ in batch])).permute(0, 3, 1, 2)
    images = images.contiguous().to(dev)
    ref = None
    if eset.paired:
        if any(r is None for _, _, r in batch):
            raise ValueError(f"set {eset.name!r} is paired but an item has no reference")
        ref = torch.from_numpy(np.stack([r for _, _, r in batch])).permute(0, 3, 1, 2)
        ref = ref.contiguous().to(dev)
    scores = scorer.score(images)
    v, b = scores.visibility, scores.blur
    in_bright = _values(metrics["brightness"], images, None, None)
    ref_bright = None if ref is None else _values(metrics["brightness"], ref, None, None)
    base = []
    for i, (item, _, _) in enumerate(batch):
        row = {"set": eset.name, "kind": eset.kind, "image": item.id,
               "band": brightness_band(in_bright[i]), "input_brightness": in_bright[i],
               "visibility": float(v[i]), "blur": float(b[i])}
        if ref_bright is not None:
            row["ref_brightness"] = ref_bright[i]
        base.append(row)
    out_rows = []
    for name, model in models.items():
        t0 = time.perf_counter()
        if model is None:
            out, route, n_iter, strength = images, [None] * n, None, None
        else:
            res = model.enhance(images, v, b)
            out = res.images.float().clamp(0, 1)
            route, n_iter, strength = res.route, res.n_iter, res.phase_strength
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ms = (time.perf_counter() - t0) * 1000 / n
        vals = {m: _values(metrics[m], out, ref, max_side) for m in wanted}
        for i in range(n):
            row = dict(base[i], enhancer=name, route=route[i],
                       n_iter=None if n_iter is None else int(n_iter[i]),
                       phase_strength=None if strength is None else float(strength[i]),
                       enhance_ms=ms)
            row.update({m: vals[m][i] for m in wanted})
            if not eset.paired and "brightness" in vals:
                y = vals["brightness"][i]
                row["in_band"] = float(TARGET_BAND[0] <= y <= TARGET_BAND[1])
            out_rows.append(row)
    return out_rows


_ID_COLUMNS = ("set", "kind", "image", "enhancer", "band", "input_brightness", "visibility",
               "blur", "route", "n_iter", "phase_strength", "enhance_ms", "ref_brightness")


def summarize(per_image: pd.DataFrame, by_band: Mapping[str, bool] | None = None,
              sets: Sequence[EvalSet] | None = None) -> pd.DataFrame:
    """Mean and std per (set, band, enhancer): ``band`` is ``'all'``, plus each input
    brightness band for sets evaluated ``by_band`` (``sets`` or ``by_band`` say which;
    default: unpaired sets) whose images span more than one band. Columns: ``set, kind,
    band, enhancer, n, input_brightness, enhance_ms``, then ``<measure>_mean`` /
    ``<measure>_std`` (``in_band_mean`` is the fraction of outputs with mean luma in
    :data:`TARGET_BAND`). Rows keep the order of sets and enhancers as measured."""
    if per_image.empty:
        return pd.DataFrame(columns=["set", "kind", "band", "enhancer", "n"])
    if by_band is None:
        by_band = ({s.name: s.by_band for s in sets} if sets is not None else {})
    measures = [c for c in per_image.columns if c not in _ID_COLUMNS]
    set_order = list(dict.fromkeys(per_image["set"]))
    enh_order = list(dict.fromkeys(per_image["enhancer"]))
    band_order = [ALL] + [b for b, _, _ in BANDS]
    rows = []
    for set_name in set_order:
        sub = per_image[per_image["set"] == set_name]
        kind = sub["kind"].iloc[0]
        banded = by_band.get(set_name, kind == "unpaired")
        groups = [(ALL, sub)]
        if banded and sub["band"].nunique() > 1:  # one band only: the 'all' row says it
            groups += [(b, sub[sub["band"] == b]) for b in band_order[1:]]
        for band, g in groups:
            if g.empty:
                continue
            for enh in enh_order:
                e = g[g["enhancer"] == enh]
                if e.empty:
                    continue
                row = {"set": set_name, "kind": kind, "band": band, "enhancer": enh,
                       "n": len(e), "input_brightness": e["input_brightness"].mean(),
                       "enhance_ms": e["enhance_ms"].mean()}
                for m in measures:
                    col = e[m].dropna()
                    if col.empty:
                        continue
                    row[f"{m}_mean"] = col.mean()
                    row[f"{m}_std"] = col.std(ddof=0)
                rows.append(row)
    return pd.DataFrame(rows)


def evaluate(
    enhancers: Mapping[str, Any],
    sets: Sequence[EvalSet],
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    **kwargs: Any,
) -> pd.DataFrame:
    """The summary table (:func:`summarize`) of :func:`measure` (same arguments). To keep
    the per-image values too, call the two yourself."""
    return summarize(measure(enhancers, sets, device, batch_size, **kwargs), sets=sets)


