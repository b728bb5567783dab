"""Evaluation of enhancers on paired (full-reference) and real (no-reference) image sets.

One call measures every enhancer on every set and gives one table (issue 3, "Evaluation and
the bar to beat")::

    from varlide.evaluation import evaluate, format_table, paired_synthetic, unpaired_folder
    sets = [paired_synthetic(), unpaired_folder("../shared/data/dev-lowlight")]
    df = evaluate({"input": None, "classic-curve": "classic-curve"}, sets)
    print(format_table(df))

Sets (:class:`EvalSet`; images are loaded lazily, one batch at a time, so memory stays
bounded whatever the folder's size):

- :func:`paired_synthetic`: the demo corpus in memory. For each seed ``s`` and index ``i``
  it draws exactly what ``make_demo_corpus(seed=s, size=size)`` draws for image ``i`` (the
  photograph ``i % 5``, a random crop, then ``degrade``), so with the default 256x256 size
  the set is bit-identical to ``python -m varlide.demo OUT --count 10 --size 256x256
  --seed s`` for each seed (images quantised to 8 bits, as the PNG files are).
- :func:`paired_from_folder`: well-exposed images of a folder (mean luma in
  ``brightness``, default [0.35, 0.60]) as pseudo-references, downscaled to ``max_side``
  and degraded the same way (the rng keyed by the relative path and the seed, so the pair
  of an image does not depend on what else is in the folder).
- :func:`paired_folders`: an input folder and a reference folder with the same relative
  names (the demo corpus's ``lowlight/`` and ``reference/``; ``varlide eval --reference``);
  inputs without a reference are left out up front, none at all is an error.
- :func:`unpaired_folder`: real images without reference, optionally filtered by mean
  luma, reported overall and by brightness band of the input (:data:`BANDS`).
- :meth:`EvalSet.from_arrays`: in-memory arrays (tests, notebooks).

Held-out images: the trainer's, by the one rule in :mod:`varlide.holdout` (content hash,
5 %, at most 48), so no image evaluated as held out was trained on.

Measures, per image and per enhancer (``'input'``, enhancer None, is the identity):

- paired sets: ``psnr``, ``ssim`` (pyiqa's weight-free metrics, output vs clean) and
  ``brightness``;
- unpaired sets: ``brightness``, ``overexposed``, ``piqe``, ``entropy``, ``sharpness`` and
  ``in_band``: whether the output's mean luma is in :data:`TARGET_BAND` [0.40, 0.55].

The prior (``analytic`` by default) scores each input once, as the pipeline does, and every
enhancer gets that v and b. ``ssim`` is computed by :class:`SeparableSSIM` by default:
pyiqa's own preprocessing (Y of YIQ, rounded to 0..255) and formula, with its 11x11
Gaussian window applied as two 1-D passes in float64 (the window is separable): equal to
pyiqa to ~3e-7, and 5-10x faster on CPU (pyiqa runs a float64 2-D convolution, which has no
fast CPU kernel: ~0.5-1 s per 256x256 image on the shared 2-core box, against ~0.1 s).
``ssim_impl='pyiqa'`` uses pyiqa's module itself; a test checks that the two agree.

:func:`default_sets` builds the issue's four sets from ``../shared/data`` (synthetic,
``sice-paired``, ``dev-lowlight``, ``sice-moderate``).

:func:`measure` gives the per-image table (for plots), :func:`summarize` the mean/std table,
:func:`evaluate` is ``summarize(measure(...))``, :func:`format_table` gives Markdown
for docs/METHOD.md with each measure's direction (from ``metric_info``).

Learned enhancers are measured with routing off (:data:`FULL_PATH`: never skip, VGPM always,
:func:`load_enhancer` / :func:`full_path`; a registered name given to :func:`measure` is
built that way), so a row measures the model, not the router.

``varlide eval`` (``flows/evaluate.py``) is built from :func:`plan_sets` (INPUT ``synthetic``,
a folder, or a folder with ``--reference``: JSON-able specs with the images chosen once),
:func:`sets_from_plan`, :func:`plan_metrics`, :func:`parse_enhancers` (``NAME[=WEIGHTS]``)
and :func:`summary_metrics` (the summary as flat tracker metrics).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from varlide import holdout
from varlide.iqa.base import Metric, MetricInfo, create_metric, metric_info
from varlide.iqa.measure import measure as measure_metric

log = logging.getLogger(__name__)

__all__ = [
    "BANDS",
    "TARGET_BAND",
    "PAIRED_METRICS",
    "UNPAIRED_METRICS",
    "EvalItem",
    "EvalSet",
    "SeparableSSIM",
    "brightness_band",
    "paired_synthetic",
    "paired_from_folder",
    "paired_folders",
    "unpaired_folder",
    "default_sets",
    "plan_sets",
    "sets_from_plan",
    "plan_metrics",
    "parse_enhancers",
    "load_enhancer",
    "full_path",
    "measure",
    "summary_metrics",
    "summarize",
    "evaluate",
    "format_table",
]

#: Mean output luma a good enhancement lands in (the exposure loss aims at 0.45 +- 0.1).
TARGET_BAND: tuple[float, float] = (0.40, 0.55)
#: Brightness bands of the *input* (mean Rec.601 luma), ``[lo, hi)``.
BANDS: tuple[tuple[str, float, float], ...] = (
    ("very dark", 0.0, 0.25),
    ("moderate", 0.25, 0.55),
    ("bright", 0.55, math.inf),
)
ALL = "all"
PAIRED_METRICS: tuple[str, ...] = ("psnr", "ssim", "brightness")
UNPAIRED_METRICS: tuple[str, ...] = ("brightness", "overexposed", "piqe", "entropy", "sharpness")
#: Mean luma of a train-sice image usable as a pseudo-reference (well exposed).
WELL_EXPOSED: tuple[float, float] = (0.35, 0.60)
#: Mean luma of the "moderately lit" real images (neither very dark nor over-exposed).
MODERATE: tuple[float, float] = (0.25, 0.55)
INPUT = "input"
#: Routing settings of learned enhancers under evaluation (``VarlideLite``'s thresholds):
#: every image takes the full path (VICM then VGPM), as the ablations measure them.
FULL_PATH: dict[str, Any] = {"skip_visibility": None, "full_blur": 0.0}

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------- split


def _path_fraction(rel_path: str, seed: int) -> float:  # a sample order, not a split
    """A uniform number in [0, 1) from ``seed`` and the path (sha256, first 8 bytes)."""
    digest = hashlib.sha256(f"{int(seed)}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def brightness_band(value: float) -> str:
    """The :data:`BANDS` name of a mean luma."""
    for name, lo, hi in BANDS:
        if lo <= value < hi:
            return name
    return BANDS[0][0] if value < BANDS[0][1] else BANDS[-1][0]


def _mean_luma(pixels: np.ndarray) -> float:
    return float(np.tensordot(pixels, _LUMA, axes=([2], [0])).mean(dtype=np.float64))


# --------------------------------------------------------------------------- sets


Loader = Callable[[], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class EvalItem:
    """One image of a set: ``load()`` gives ``(input, reference or None)``, (H, W, 3)
    float32 in [0, 1]; ``meta`` says where it came from (source, seed, degradation ...)."""

    id: str
    load: Loader
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    """A named list of items; ``paired``: every item has a reference. ``by_band``: the
    summary also reports each input brightness band."""

    name: str
    paired: bool
    items: list[EvalItem]
    by_band: bool = False
    description: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> str:
        return "paired" if self.paired else "unpaired"

    @classmethod
    def from_arrays(
        cls,
        name: str,
        images: Sequence[np.ndarray],
        references: Sequence[np.ndarray] | None = None,
        ids: Sequence[str] | None = None,
        by_band: bool = False,
    ) -> EvalSet:
        """A set of in-memory (H, W, 3) images (float in [0, 1] or uint8)."""
        if references is not None and len(references) != len(images):
            raise ValueError(f"{len(images)} images but {len(references)} references")
        ids = list(ids) if ids is not None else [f"{i:04d}" for i in range(len(images))]
        items = []
        for i, img in enumerate(images):
            x = _as_float(img)
            r = None if references is None else _as_float(references[i])
            items.append(EvalItem(ids[i], (lambda x=x, r=r: (x, r)), {}))
        return cls(name, references is not None, items, by_band=by_band)


def _as_float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    return np.clip(a.astype(np.float32, copy=False), 0.0, 1.0)


def _quantise(x: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> the 8-bit grid, as writing the image to a PNG/JPEG file would."""
    from varlide.imaging.encode import to_uint8

    return to_uint8(x).astype(np.float32) / np.float32(255.0)


def paired_synthetic(
    seeds: Sequence[int] = (0, 1, 2),
    crops_per_photo: int = 2,
    size: tuple[int, int] = (256, 256),
    quantize: bool = True,
    name: str = "synthetic",
) -> EvalSet:
    """(low, clean) pairs from the bundled scikit-image photographs (``source_photographs``).

    Per seed, ``crops_per_photo * n_photos`` images, image ``i`` drawn like the demo
    corpus's image ``i`` (``np.random.default_rng([seed, i])``: photograph ``i % n``, a
    random ``size`` (width, height) crop, then :func:`varlide.demo.degrade`). Deterministic,
    and a prefix-stable function of ``seeds`` and ``crops_per_photo``. ``quantize``: the low
    image on the 8-bit grid (what a file holds; the clean crop is 8-bit anyway).
    """
    from varlide.demo import _photos_uint8

    if crops_per_photo < 1:
        raise ValueError(f"crops_per_photo: expected >= 1, got {crops_per_photo}")
    size = (int(size[0]), int(size[1]))
    n_photos = len(_photos_uint8())
    items = []
    for seed in seeds:
        for i in range(crops_per_photo * n_photos):
            photo = _photos_uint8()[i % n_photos][0]
            items.append(EvalItem(
                f"s{int(seed)}-{i:04d}_{photo}",
                (lambda s=int(seed), i=i: _synthetic_pair(s, i, size, quantize)),
                {"source": photo, "seed": int(seed), "index": i},
            ))
    return EvalSet(
        name, True, items,
        description=f"demo-corpus degradations of {n_photos} photographs x {crops_per_photo} "
                    f"crops x {len(seeds)} seeds at {size[0]}x{size[1]}",
    )


def _synthetic_pair(seed: int, index: int, size: tuple[int, int], quantize: bool):
    from varlide.demo import _crop, _photos_uint8, degrade

    photos = _photos_uint8()
    rng = np.random.default_rng([seed, index])
    clean_u8, _ = _crop(photos[index % len(photos)][1], size, rng)
    clean = clean_u8.astype(np.float32) / np.float32(255.0)
    low, _ = degrade(clean, rng)
    return (_quantise(low) if quantize else low), clean


def _read_image(uri: str, max_side: int | None = None) -> np.ndarray:
    """Decode an image file at ``uri`` to (H, W, 3) float32, area-downscaled to ``max_side``."""
    return _shrink(_decode(uri), max_side)


def _decode(uri: str) -> np.ndarray:
    from varlide.imaging.decode import decode_image
    from varlide.storage.uri import filesystem

    fs, path = filesystem(uri)
    return decode_image(fs.cat_file(path)).pixels


def _shrink(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Area (box) downscale of a decoded 8-bit image to long side ``max_side`` (None: as is)."""
    if max_side and max(pixels.shape[:2]) > max_side:
        from PIL import Image

        h, w = pixels.shape[:2]
        s = max_side / max(h, w)
        new = (max(1, round(w * s)), max(1, round(h * s)))
        u8 = Image.fromarray((pixels * 255 + 0.5).astype(np.uint8))  # decoded 8-bit: exact
        pixels = np.asarray(u8.resize(new, Image.Resampling.BOX), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _select(
    uri: str,
    rel_paths: Sequence[str] | None,
    brightness: tuple[float, float] | None,
    limit: int | None,
    max_side: int | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[tuple[str, float]]:
    """(rel_path, mean luma) of the images to use, sorted by path.

    Candidates are visited in a hash order (the same in every process, unrelated to the
    names), filtered by mean luma, and the first ``limit`` kept: a deterministic, unbiased
    subset that only decodes what it needs.
    """
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import join

    if rel_paths is None:
        rel_paths = [f.rel_path for f in list_corpus(uri, include=include, exclude=exclude)]
    order = sorted(rel_paths, key=lambda r: _path_fraction(r, -1))
    chosen: list[tuple[str, float]] = []
    for rel in order:
        if limit is not None and len(chosen) >= limit:
            break
        try:
            y = _mean_luma(_read_image(join(uri, rel), max_side))
        except Exception as exc:  # unreadable or undecodable: skipped, loudly
            log.warning("evaluation: skipping %s (%s)", rel, exc)
            continue
        if brightness is None or brightness[0] <= y <= brightness[1]:
            chosen.append((rel, y))
    return sorted(chosen)


def paired_from_folder(
    uri: str,
    rel_paths: Sequence[str] | None = None,
    *,
    brightness: tuple[float, float] | None = WELL_EXPOSED,
    seeds: Sequence[int] = (0,),
    max_side: int | None = 256,
    limit: int | None = 24,
    quantize: bool = True,
    name: str | None = None,
) -> EvalSet:
    """Well-exposed images of a folder as pseudo-references, degraded like the demo corpus.

    ``rel_paths``: the candidates (e.g. ``holdout.split_corpus(folder)[1]``; default: every
    image under ``uri``); ``brightness``: the mean-luma range of a usable reference;
    ``max_side``: references are area-downscaled to this long side first (it also averages
    JPEG artefacts away; None = full size); ``limit``: at most this many references (a
    deterministic subset, see ``_select``). Each reference is degraded once per seed with
    ``np.random.default_rng([seed, h])``, ``h`` a hash of its relative path.
    """
    from varlide.storage.uri import join

    chosen = _select(uri, rel_paths, brightness, limit, max_side)
    items = []
    for seed in seeds:
        for rel, y in chosen:
            key = int(_path_fraction(rel, 0) * 2**32)

            def load(src=join(uri, rel), s=int(seed), key=key):
                clean = _read_image(src, max_side)
                low, _ = _degrade(clean, np.random.default_rng([s, key]))
                return (_quantise(low) if quantize else low), clean

            items.append(EvalItem(f"s{int(seed)}-{rel}", load,
                                  {"source": rel, "seed": int(seed), "ref_brightness": y}))
    return EvalSet(
        name or _default_name(uri, "paired"), True, items,
        description=f"{len(chosen)} images of {uri} with mean luma in {brightness} as "
                    f"references, x {len(seeds)} seeds, long side {max_side}",
    )


def _degrade(clean: np.ndarray, rng: np.random.Generator):
    from varlide.demo import degrade

    return degrade(clean, rng)


def paired_folders(
    input_uri: str,
    reference_uri: str,
    *,
    rel_paths: Sequence[str] | None = None,
    limit: int | None = None,
    max_side: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    name: str | None = None,
) -> EvalSet:
    """Inputs under ``input_uri``, references with the same relative names under
    ``reference_uri`` (the demo corpus's ``lowlight/`` and ``reference/``).

    Only inputs that have a reference are kept (both folders are listed up front, so
    ``len()`` is the number of pairs); none at all raises ``ValueError``, a missing
    reference folder ``FileNotFoundError``. ``rel_paths``: the candidates (default: every
    image under ``input_uri``, after ``include`` / ``exclude``); ``limit``: at most this many
    pairs, a deterministic subset (hash order of the path, as ``_select``) decoded only when
    measured; ``max_side``: input and reference are area-downscaled alike to this long side
    after checking they have the same size (a differently sized pair skips that image).
    """
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import join

    if rel_paths is None:
        rel_paths = [f.rel_path for f in list_corpus(input_uri, include=include,
                                                     exclude=exclude)]
    try:
        refs = {f.rel_path for f in list_corpus(reference_uri)}
    except FileNotFoundError:
        raise FileNotFoundError(f"reference not found: {reference_uri}") from None
    chosen = [rel for rel in rel_paths if rel in refs]
    if rel_paths and not chosen:
        raise ValueError(f"no image of {input_uri} has a reference of the same relative name "
                         f"under {reference_uri} ({len(rel_paths)} inputs, e.g. "
                         f"{sorted(rel_paths)[0]!r}; {len(refs)} reference images)")
    if len(chosen) < len(rel_paths):
        log.warning("evaluation: %d of %d inputs have no reference under %s; left out",
                    len(rel_paths) - len(chosen), len(rel_paths), reference_uri)
    if limit is not None:
        chosen = sorted(sorted(chosen, key=lambda r: _path_fraction(r, -1))[:limit])
    items = []
    for rel in sorted(chosen):
        def load(src=join(input_uri, rel), ref=join(reference_uri, rel)):
            x, r = _decode(src), _decode(ref)
            if x.shape != r.shape:
                raise ValueError(f"reference {ref} is {r.shape[1]}x{r.shape[0]}, "
                                 f"input {x.shape[1]}x{x.shape[0]}")
            return _shrink(x, max_side), _shrink(r, max_side)

        items.append(EvalItem(rel, load, {"source": rel}))
    desc = f"{len(items)} images of {input_uri} against {reference_uri}"
    if max_side:
        desc += f", long side <= {max_side}"
    return EvalSet(name or _default_name(input_uri, "paired"), True, items, description=desc)


def unpaired_folder(
    uri: str,
    name: str | None = None,
    rel_paths: Sequence[str] | None = None,
    *,
    brightness: tuple[float, float] | None = None,
    by_band: bool = True,
    max_side: int | None = None,
    limit: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> EvalSet:
    """Real images without reference (e.g. dev-lowlight, or held-out moderately lit images
    of train-sice: ``rel_paths=holdout.split_corpus(...)[1], brightness=MODERATE``).

    ``brightness`` filters by the input's mean luma (decodes every candidate once; without
    it and without ``limit`` nothing is decoded until evaluation); ``max_side`` area-
    downscales inputs (None: stored size); ``limit`` keeps a deterministic subset.
    """
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import join

    if brightness is None and limit is None:
        if rel_paths is None:
            rel_paths = [f.rel_path for f in list_corpus(uri, include=include, exclude=exclude)]
        chosen = sorted(rel_paths)
    else:
        chosen = [rel for rel, _ in _select(uri, rel_paths, brightness, limit, max_side,
                                            include, exclude)]
    items = [
        EvalItem(rel, (lambda src=join(uri, rel): (_read_image(src, max_side), None)),
                 {"source": rel})
        for rel in chosen
    ]
    desc = f"{len(items)} images of {uri}"
    if brightness is not None:
        desc += f" with mean luma in {brightness}"
    return EvalSet(name or _default_name(uri, "real"), False, items, by_band=by_band,
                   description=desc)


def _default_name(uri: str, _kind: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def default_sets(
    data_root: str = "../shared/data",
    fraction: float = holdout.FRACTION,
    limit: int | None = holdout.LIMIT,
    *,
    synthetic: bool = True,
    pseudo_limit: int | None = 24,
    moderate_limit: int | None = 24,
    max_side: int | None = 256,
) -> list[EvalSet]:
    """Issue 3's sets, those whose data exists under ``data_root``:

    ``synthetic`` (:func:`paired_synthetic` defaults); ``sice-paired``: well-exposed
    held-out train-sice images (the trainer's: ``holdout.split_corpus(..., fraction,
    limit)``) as pseudo-references; ``dev-lowlight`` (real, very dark but one);
    ``sice-moderate``: held-out train-sice images with mean luma in :data:`MODERATE`, at
    ``max_side``.
    """
    from varlide.storage.uri import filesystem, join

    sets: list[EvalSet] = [paired_synthetic()] if synthetic else []
    sice = join(data_root, "train-sice")
    sice_fs, sice_path = filesystem(sice)
    held: list[str] | None = None
    if sice_fs.exists(sice_path):
        held = holdout.split_corpus(sice, fraction, limit)[1]  # the trainer's held-out
        sets.append(paired_from_folder(sice, held, limit=pseudo_limit, max_side=max_side,
                                       name="sice-paired"))
    low = join(data_root, "dev-lowlight")
    low_fs, low_path = filesystem(low)
    if low_fs.exists(low_path):
        sets.append(unpaired_folder(low, "dev-lowlight"))
    if held is not None:
        sets.append(unpaired_folder(sice, "sice-moderate", held, brightness=MODERATE,
                                    limit=moderate_limit, max_side=max_side))
    return sets


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
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: expected >= 1, got {max_images}")
    if seeds < 1:
        raise ValueError(f"seeds: expected >= 1, got {seeds}")
    if max_side is not None and max_side < 0:
        raise ValueError(f"max_side: expected >= 0 (0: as stored), got {max_side}")
    max_side = max_side or None
    if input_uri == SYNTHETIC:
        if reference_uri:
            raise ValueError("INPUT 'synthetic' makes its own references; --reference is for "
                             "a folder INPUT (a folder named synthetic: pass ./synthetic)")
        side = min(max_side or SYNTHETIC_SIDE, SYNTHETIC_SIDE)
        if side < 16:
            raise ValueError(f"max_side: synthetic crops need at least 16 px, got {side}")
        return [{"kind": "synthetic", "name": SYNTHETIC, "seeds": list(range(seeds)),
                 "crops_per_photo": 2, "size": [side, side], "limit": max_images}]
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


def sets_from_plan(plan: Sequence[Mapping[str, Any]]) -> list[EvalSet]:
    """The :class:`EvalSet` of each spec of :func:`plan_sets` (images loaded lazily)."""
    sets = []
    for spec in plan:
        kind = spec["kind"]
        if kind == "synthetic":
            s = paired_synthetic(seeds=tuple(spec["seeds"]),
                                 crops_per_photo=int(spec["crops_per_photo"]),
                                 size=tuple(spec["size"]), name=spec["name"])
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


# --------------------------------------------------------------------------- measures


class SeparableSSIM(Metric):
    """pyiqa's ``ssim`` (Y of YIQ rounded to 0..255, 11x11 Gaussian, sigma 1.5, 'valid',
    no downsampling, float64) with the Gaussian window applied as two 1-D passes of
    shifted sums (float64 ``conv2d`` has no fast CPU kernel). The statistics of the last
    reference tensor are kept (it must not be changed in place between calls), so scoring
    several outputs against one reference costs 3 filterings each instead of 5."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from pyiqa.archs.func_util import preprocess_rgb
        from pyiqa.matlab_utils import fspecial

        self.info = metric_info("ssim")
        self.device = torch.device(device)
        self._pre = preprocess_rgb
        win = fspecial(11, 1.5, 1)[0, 0].double()  # pyiqa's window (float32, normalised)
        self._g = win.sum(dim=1).tolist()  # its separable factor: the window is g g^T
        self._ref: torch.Tensor | None = None
        self._ref_stats: tuple[torch.Tensor, ...] = ()

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self._g)
        for dim in (2, 3):
            n = x.shape[dim] - k + 1
            acc = x.narrow(dim, 0, n) * self._g[0]
            for j in range(1, k):
                acc.add_(x.narrow(dim, j, n), alpha=self._g[j])
            x = acc
        return x

    def _y(self, images: torch.Tensor) -> torch.Tensor:
        return self._pre(images.to(self.device).float(), True, 255, "yiq").double()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None):
        if reference is None:
            raise ValueError("metric 'ssim' needs a reference image")
        if images.shape != reference.shape:
            raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
        if min(images.shape[-2:]) < len(self._g):
            raise ValueError(f"ssim needs images of at least {len(self._g)} px a side")
        if reference is not self._ref:  # the same tensor object (held here, so never reused)
            y = self._y(reference)
            mu2 = self._filter(y)
            self._ref_stats = (y, mu2, mu2 * mu2, self._filter(y * y) - mu2 * mu2)
            self._ref = reference
        y, mu2, mu2_sq, s2 = self._ref_stats
        x = self._y(images)
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        mu1 = self._filter(x)
        mu1_sq, mu12 = mu1 * mu1, mu1 * mu2
        s1 = self._filter(x * x) - mu1_sq
        s12 = self._filter(x * y) - mu12
        cs = F.relu((2 * s12 + c2) / (s1 + s2 + c2))
        return (((2 * mu12 + c1) / (mu1_sq + mu2_sq + c1)) * cs).mean(dim=(1, 2, 3))


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


# --------------------------------------------------------------------------- Markdown

DIGITS = {"psnr": 2, "ssim": 4, "brightness": 3, "overexposed": 4, "piqe": 2, "entropy": 3,
          "sharpness": 1, "in_band": 2}


def measure_info(name: str) -> MetricInfo | None:
    """A measure's metadata (direction, range), ``in_band`` included; None if unknown."""
    if name == "in_band":
        return MetricInfo("in_band", False, (0.0, 1.0),
                          description=f"fraction of outputs with mean luma in {TARGET_BAND}")
    try:
        return metric_info(name)
    except KeyError:
        return None


def _header(name: str) -> str:
    if name == "in_band":
        return f"in [{TARGET_BAND[0]:.2f}, {TARGET_BAND[1]:.2f}] ↑"
    info = measure_info(name)
    arrow = "" if info is None or info.lower_better is None else (
        " ↓" if info.lower_better else " ↑")
    return f"{name}{arrow}"


def format_table(df: pd.DataFrame, std: bool = True, bold_best: bool = True) -> str:
    """Markdown for docs/METHOD.md: one table per kind of set (paired, unpaired), one row per
    (set, band, enhancer), a column per measure headed with its direction (↑ higher is
    better, ↓ lower is better, from ``metric_info``; brightness has none: its target is
    :data:`TARGET_BAND`), cells ``mean ± std``; the best enhancer (not the input) of each
    set and band in bold."""
    if df.empty:
        return ""
    blocks = []
    for kind in list(dict.fromkeys(df["kind"])):
        sub = df[df["kind"] == kind]
        measures = [c[: -len("_mean")] for c in sub.columns
                    if c.endswith("_mean") and sub[c].notna().any()]
        show_band = (sub["band"] != ALL).any()
        head = ["set"] + (["band"] if show_band else []) + ["enhancer", "n"]
        head += [_header(m) for m in measures]
        lines = ["| " + " | ".join(head) + " |",
                 "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |"]
        best: dict[tuple, dict[str, float]] = {}
        if bold_best:
            for key, g in sub[sub["enhancer"] != INPUT].groupby(["set", "band"], sort=False):
                best[key] = {}
                for m in measures:
                    info = measure_info(m)
                    col = g[f"{m}_mean"].dropna()
                    if info is None or info.lower_better is None or len(g) < 2 or col.empty:
                        continue
                    best[key][m] = col.min() if info.lower_better else col.max()
        for _, r in sub.iterrows():
            cells = [str(r["set"])] + ([str(r["band"])] if show_band else [])
            cells += [str(r["enhancer"]), str(int(r["n"]))]
            for m in measures:
                mean = r.get(f"{m}_mean")
                if mean is None or pd.isna(mean):
                    cells.append("")
                    continue
                d = DIGITS.get(m, 3)
                text = f"{mean:.{d}f}"
                sd = r.get(f"{m}_std")
                if std and sd is not None and not pd.isna(sd) and int(r["n"]) > 1:
                    text += f" ± {sd:.{d}f}"
                target = best.get((r["set"], r["band"]), {}).get(m)
                if (r["enhancer"] != INPUT and target is not None
                        and round(mean, d) == round(target, d)):
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    legend = (f"↑ higher is better, ↓ lower is better; brightness (mean Rec.601 luma) has no "
              f"direction: the target is [{TARGET_BAND[0]:.2f}, {TARGET_BAND[1]:.2f}]. "
              f"Mean ± std over images; best enhancer per set and band in bold.")
    return "\n\n".join(blocks) + "\n\n" + legend + "\n"
