"""``varlide eval``'s plan: its settings, the sets chosen once (JSON-able), the measures,
the enhancers, and the summary as flat metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from varlide.evaluation.sets import (
    ALL,
    INPUT,
    PAIRED_METRICS,
    UNPAIRED_METRICS,
    EvalSet,
    degradation_overrides,
    paired_folders,
    paired_synthetic,
    unpaired_folder,
)
from varlide.iqa.base import metric_info

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- `varlide eval`

#: ``varlide eval synthetic``: the demo-corpus generator instead of a folder.
SYNTHETIC = "synthetic"
#: Long side (px) folder images are area-downscaled to by ``varlide eval`` (0/None: as stored).
DEFAULT_MAX_SIDE = 512
#: Side of the synthetic set's square crops (``min(max_side, 256)``; 256 = the demo corpus).
SYNTHETIC_SIDE = 256
#: Enhancers ``varlide eval`` measures when none is named (``input`` is always added).
DEFAULT_ENHANCERS: tuple[str, ...] = ("classic-curve", "zero-dce", "varlide-lite")


@dataclass(frozen=True)
class EvalRunConfig:
    """``varlide eval``'s settings, read like every other section
    (``varlide.config.load_settings``: YAML ``--config`` < ``VARLIDE_EVAL_<FIELD>`` < flags).

    ``enhancers``: ``NAME`` or ``NAME=WEIGHTS`` (a folder, URI or ``models:/NAME@ALIAS``);
    ``metrics``: measure names (None: the set kind's defaults); ``max_side``: long side
    folder images are area-downscaled to (0 or None: as stored)."""

    reference: str | None = None
    enhancers: tuple[str, ...] = DEFAULT_ENHANCERS
    metrics: tuple[str, ...] | None = None
    max_images: int | None = None
    seeds: int = 1
    max_side: int | None = DEFAULT_MAX_SIDE
    device: str = "auto"
    batch_size: int = 8
    iqa_max_side: int | None = None
    out: str | None = None
    experiment: str = "varlide-eval"

    def __post_init__(self) -> None:
        for name in ("max_images", "seeds", "batch_size", "iqa_max_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device: one of cpu, cuda, auto, got {self.device!r}")
        if not self.enhancers:
            raise ValueError("enhancers: at least one")


def plan_sets(
    input_uri: str,
    reference_uri: str | None = None,
    *,
    max_images: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    seeds: int = 1,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    degradations: Sequence[str] | str = ("all",),
) -> list[dict[str, Any]]:
    """The sets of ``varlide eval INPUT [--reference URI]`` as JSON-able specs, with the
    images chosen now (:func:`sets_from_plan` builds them, so every enhancer is measured on
    the same images even when the folder changes meanwhile).

    - INPUT ``synthetic`` (:data:`SYNTHETIC`): :func:`paired_synthetic` over seeds
      ``0..seeds-1``, 2 crops per photograph, square crops of ``min(max_side, 256)`` px;
    - INPUT with ``reference_uri``: :func:`paired_folders` (pairs by relative name);
    - INPUT alone: :func:`unpaired_folder` (reported by input brightness band too).

    ``max_images``: at most this many images (synthetic: the first ones, seed by seed;
    folders: a deterministic subset in hash order of the path); ``max_side``: folder images
    are area-downscaled to this long side (0 or None: as stored). Raises
    ``FileNotFoundError`` for a missing folder and ``ValueError`` for an empty one, a
    reference folder without a single matching name, or a bad count.

    ``degradations``: synthetic only, one set per :data:`~varlide.evaluation.sets.DEGRADATIONS`
    preset (a list or ``'all,blur'``; sets ``synthetic``, ``synthetic-blur``, ...; the same
    crops in each), so an ablation sees what each stage fixes; an unknown preset raises
    ``ValueError``.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: expected >= 1, got {max_images}")
    if seeds < 1:
        raise ValueError(f"seeds: expected >= 1, got {seeds}")
    if max_side is not None and max_side < 0:
        raise ValueError(f"max_side: expected >= 0 (0: as stored), got {max_side}")
    max_side = max_side or None
    presets = _plan_degradations(degradations, input_uri)
    if input_uri == SYNTHETIC:
        if reference_uri:
            raise ValueError("INPUT 'synthetic' makes its own references; --reference is for "
                             "a folder INPUT (a folder named synthetic: pass ./synthetic)")
        side = min(max_side or SYNTHETIC_SIDE, SYNTHETIC_SIDE)
        if side < 16:
            raise ValueError(f"max_side: synthetic crops need at least 16 px, got {side}")
        return [{"kind": "synthetic", "name": SYNTHETIC if d == "all" else f"{SYNTHETIC}-{d}",
                 "degradation": d, "seeds": list(range(seeds)), "crops_per_photo": 2,
                 "size": [side, side], "limit": max_images} for d in presets]
    if reference_uri:
        s = paired_folders(input_uri, reference_uri, limit=max_images, max_side=max_side,
                           include=include, exclude=exclude)
        spec = {"kind": "paired", "name": s.name, "input": input_uri,
                "reference": reference_uri}
    else:
        s = unpaired_folder(input_uri, limit=max_images, max_side=max_side, include=include,
                            exclude=exclude)
        spec = {"kind": "unpaired", "name": s.name, "uri": input_uri}
    if not s.items:
        raise ValueError(f"no readable images under {input_uri}")
    spec.update(rel_paths=[item.id for item in s.items], max_side=max_side)
    return [spec]


def _plan_degradations(degradations: Sequence[str] | str, input_uri: str) -> list[str]:
    """The distinct presets asked for (``'a,b'`` or a sequence), checked: known, and other
    than ``all`` only for INPUT ``synthetic`` (a folder is not degraded)."""
    if isinstance(degradations, str):
        degradations = degradations.split(",")
    presets = list(dict.fromkeys(d.strip() for d in degradations))
    for d in presets:
        degradation_overrides(d)  # ValueError naming the known presets
    if not presets or (input_uri != SYNTHETIC and presets != ["all"]):
        raise ValueError(f"degradations: one or more presets, and only 'all' unless INPUT is "
                         f"{SYNTHETIC!r} (a folder is not degraded), got {presets}")
    return presets


def sets_from_plan(plan: Sequence[Mapping[str, Any]]) -> list[EvalSet]:
    """The :class:`EvalSet` of each spec of :func:`plan_sets` (images loaded lazily)."""
    sets = []
    for spec in plan:
        kind = spec["kind"]
        if kind == "synthetic":
            s = paired_synthetic(seeds=tuple(spec["seeds"]),
                                 crops_per_photo=int(spec["crops_per_photo"]),
                                 size=tuple(spec["size"]), name=spec["name"],
                                 degradation=spec.get("degradation", "all"))
            if spec.get("limit") and spec["limit"] < len(s.items):
                s.items = s.items[: spec["limit"]]
                s.description += f", first {spec['limit']} images"
        elif kind == "paired":
            s = paired_folders(spec["input"], spec["reference"], rel_paths=spec["rel_paths"],
                               max_side=spec["max_side"], name=spec["name"])
        elif kind == "unpaired":
            s = unpaired_folder(spec["uri"], spec["name"], spec["rel_paths"],
                                max_side=spec["max_side"])
        else:
            raise ValueError(f"unknown set kind {kind!r} (synthetic, paired, unpaired)")
        sets.append(s)
    return sets


def plan_metrics(
    metrics: Sequence[str] | str | None, plan: Sequence[Mapping[str, Any]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(paired_metrics, unpaired_metrics)`` for ``measure`` from a list of measure names
    (``'a,b'`` or a sequence; None: :data:`PAIRED_METRICS` / :data:`UNPAIRED_METRICS`).
    Full-reference measures go to paired sets only; asking for one with no paired set in
    ``plan``, or for an unknown name, raises ``ValueError``."""
    if metrics is None:
        return PAIRED_METRICS, UNPAIRED_METRICS
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    names = list(dict.fromkeys(m.strip() for m in metrics if m.strip()))
    if not names:
        raise ValueError("metrics: no measure named")
    infos = {}
    for m in names:
        try:
            infos[m] = metric_info(m)
        except KeyError as exc:  # UnknownNameError: the message lists the known names
            raise ValueError(str(exc)) from None
    needs_ref = [m for m in names if infos[m].needs_reference]
    if needs_ref and not any(spec["kind"] != "unpaired" for spec in plan):
        raise ValueError(f"{', '.join(needs_ref)} need(s) a reference image: pass "
                         "--reference URI (or INPUT synthetic), or leave it out of --metrics")
    return tuple(names), tuple(m for m in names if m not in needs_ref)


def parse_enhancers(
    specs: Sequence[str], weights: Mapping[str, str] | None = None
) -> dict[str, dict[str, str | None]]:
    """``label -> {"name", "weights"}`` from ``NAME`` / ``NAME=WEIGHTS`` specs (registered
    enhancer names; ``weights`` maps a name to weights for specs without ``=``). The label
    is the name, or the whole spec when a name is given more than once. ``input`` (the
    identity row, always measured) is accepted and left out. Raises ``ValueError`` for an
    unknown name, a repeated spec, or weights for an enhancer not in ``specs``."""
    from varlide.models import ENHANCERS

    weights = dict(weights or {})
    parsed: list[tuple[str, str | None, str]] = []
    for spec in specs:
        name, sep, w = (p.strip() for p in str(spec).partition("="))
        if sep and not w:
            raise ValueError(f"enhancer {spec!r}: no weights after '=' (NAME=WEIGHTS_URI)")
        if name == INPUT:
            if w:
                raise ValueError("enhancer 'input' is the identity; it takes no weights")
            continue
        if name not in ENHANCERS:
            raise ValueError(f"unknown enhancer {name!r}; known: "
                             f"{', '.join([*ENHANCERS.names(), INPUT])}")
        parsed.append((name, w or weights.get(name) or None, spec))
    unused = set(weights) - {name for name, _, _ in parsed}
    if unused:
        raise ValueError(f"weights given for enhancer(s) not evaluated: {sorted(unused)}")
    counts: dict[str, int] = {}
    for name, _, _ in parsed:
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, dict[str, str | None]] = {}
    for name, w, spec in parsed:
        label = name if counts[name] == 1 else (f"{name}={w}" if w else name)
        if label in out:
            raise ValueError(f"enhancer {spec!r} given twice")
        out[label] = {"name": name, "weights": w}
    return out


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Flat ``{key: value}`` of a :func:`summarize` table for a tracker: keys
    ``<set>/<enhancer>/<measure>`` (band ``all``), ``<set>/<band>/<enhancer>/<measure>``
    (other bands), ``<set>/n``; each part made safe for MLflow (``[/\\w.\\- :]``)."""
    import re

    def part(text: Any) -> str:
        return re.sub(r"[^\w.\- :]", "_", str(text))

    out: dict[str, float] = {}
    for _, row in summary.iterrows():
        prefix = part(row["set"]) + ("" if row["band"] == ALL else f"/{part(row['band'])}")
        if row["band"] == ALL:
            out[f"{part(row['set'])}/n"] = float(row["n"])
        for col, value in row.items():
            if not (isinstance(col, str) and col.endswith("_mean")) or pd.isna(value):
                continue
            out[f"{prefix}/{part(row['enhancer'])}/{col[: -len('_mean')]}"[:250]] = float(value)
        out[f"{prefix}/{part(row['enhancer'])}/enhance_ms"[:250]] = float(row["enhance_ms"])
    return out


