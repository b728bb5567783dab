"""Evaluation sets: synthetic pairs, folders with pseudo-references or references, real
images by brightness band, and the default sets (the trainer's held-out images)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from varlide import holdout
from varlide.priors.analytic import LUMA_601

if TYPE_CHECKING:
    from varlide.demo import Degradation

log = logging.getLogger(__name__)


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

_LUMA = np.array(LUMA_601, dtype=np.float32)  # the one Rec.601 definition


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


# --------------------------------------------------------------------------- degradations

#: The "off" value of each :class:`varlide.demo.Degradation` parameter, by part of the model.
_OFF: dict[str, dict[str, float]] = {
    "darkening": {"gamma": 1.0, "exposure": 1.0},
    "motion blur": {"kernel_length": 1},
    "sensor noise": {"noise_sigma": 0.0, "shot_noise": 0.0},
}
#: Blur lengths (px) of the ``blur`` preset: the demo draws 1..15 px and a third nearly sharp
#: (1..3), so a "well-lit, motion-blurred" set draws its length from these instead.
BLUR_LENGTHS: tuple[int, ...] = (5, 7, 9, 11, 13, 15, 17, 19, 21)
#: Degradation presets of the synthetic sets, as :func:`varlide.demo.degrade` overrides:
#: each isolates one part of the model, so an ablation can tell what a denoiser, a deblurring
#: stage and a tone curve each fix. ``all`` is the demo corpus (no override); a tuple value
#: is drawn uniformly from its values with one ``rng.integers`` draw, after the parameter
#: draws of ``degrade`` (see ``_applied``); every other value replaces the draw.
DEGRADATIONS: dict[str, dict[str, Any]] = {
    "all": {},
    "dark": {**_OFF["motion blur"], **_OFF["sensor noise"]},
    "blur": {**_OFF["darkening"], **_OFF["sensor noise"], "kernel_length": BLUR_LENGTHS},
    "noise": {**_OFF["darkening"], **_OFF["motion blur"]},
    "sharp": {**_OFF["darkening"], **_OFF["motion blur"], **_OFF["sensor noise"]},
}


def degradation_overrides(
    degradation: str, kernel_lengths: Sequence[int] | None = None
) -> dict[str, Any]:
    """The overrides of a :data:`DEGRADATIONS` preset, ``kernel_lengths`` replacing the blur
    lengths of a preset that draws them (``blur``); ``ValueError`` naming the known presets."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation: unknown preset {degradation!r}; known: "
                         f"{', '.join(DEGRADATIONS)}")
    overrides = dict(DEGRADATIONS[degradation])
    if kernel_lengths is not None:
        if not isinstance(overrides.get("kernel_length"), tuple):
            raise ValueError(f"kernel_lengths: preset {degradation!r} does not draw a blur "
                             "length; only 'blur' does")
        lengths = tuple(int(v) for v in kernel_lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"kernel_lengths: expected lengths >= 1, got {kernel_lengths}")
        overrides["kernel_length"] = lengths
    return overrides


def _parts(overrides: dict[str, Any]) -> str:
    """Which parts of the model a preset leaves on, for a set's description."""
    on = []
    for part, off in _OFF.items():
        if any(overrides.get(k, "drawn") != v for k, v in off.items()):
            lengths = overrides.get("kernel_length")
            on.append(f"{part} {list(lengths)} px" if part == "motion blur"
                      and isinstance(lengths, tuple) else part)
    return " + ".join(on) if on else "none: input = clean reference"


def _applied(rng: np.random.Generator, overrides: dict[str, Any]) -> Degradation:
    """The :class:`~varlide.demo.Degradation` that ``degrade(clean, rng, **asdict(it))``
    applies, drawn from a copy of ``rng`` exactly as ``degrade`` draws (``rng`` itself is not
    moved, so preset ``all`` gives today's pixels): known without the pixels, for ``meta``."""
    from varlide.demo import _draw

    probe = copy.deepcopy(rng)
    drawn = {k: v for k, v in overrides.items() if isinstance(v, tuple)}
    params = dataclasses.replace(_draw(probe), **{k: v for k, v in overrides.items()
                                                   if k not in drawn})
    for key, values in drawn.items():  # after _draw's fixed number of draws
        setattr(params, key, values[int(probe.integers(len(values)))])
    params.kernel_length = int(params.kernel_length)
    return params


def _degraded(
    clean: np.ndarray, rng: np.random.Generator, params: Degradation, quantize: bool
) -> np.ndarray:
    """``clean`` degraded with exactly ``params`` (noise from ``rng``), 8-bit if ``quantize``."""
    from varlide.demo import degrade

    low, _ = degrade(clean, rng, **dataclasses.asdict(params))
    return _quantise(low) if quantize else low


def true_kernel(item: EvalItem) -> np.ndarray:
    """The motion-blur kernel applied to a degraded item's input, from its ``meta`` (no
    pixels loaded): the ground truth a deblurring benchmark compares an estimate with."""
    from varlide.demo import motion_blur_kernel

    if "kernel_length" not in item.meta or "kernel_angle" not in item.meta:
        raise ValueError(f"item {item.id!r} carries no blur kernel in its meta (only the "
                         "degraded sets paired_synthetic / paired_from_folder do)")
    return motion_blur_kernel(item.meta["kernel_length"], item.meta["kernel_angle"])


# --------------------------------------------------------------------------- synthetic


def paired_synthetic(
    seeds: Sequence[int] = (0, 1, 2),
    crops_per_photo: int = 2,
    size: tuple[int, int] = (256, 256),
    quantize: bool = True,
    name: str | None = None,
    *,
    degradation: str = "all",
    kernel_lengths: Sequence[int] | None = None,
) -> EvalSet:
    """(low, clean) pairs from the bundled scikit-image photographs (``source_photographs``).

    Per seed, ``crops_per_photo * n_photos`` images, image ``i`` drawn like the demo
    corpus's image ``i`` (``np.random.default_rng([seed, i])``: photograph ``i % n``, a
    random ``size`` (width, height) crop, then :func:`varlide.demo.degrade`). Deterministic,
    and a prefix-stable function of ``seeds`` and ``crops_per_photo``. ``quantize``: the low
    image on the 8-bit grid (what a file holds; the clean crop is 8-bit anyway).

    ``degradation``: a :data:`DEGRADATIONS` preset (``all``: the demo corpus; ``dark``,
    ``blur``, ``noise``: that part only; ``sharp``: none), the same crops and ids in every
    preset; ``kernel_lengths``: the ``blur`` preset's lengths (default :data:`BLUR_LENGTHS`).
    ``name`` defaults to ``synthetic`` (``synthetic-<preset>`` for another preset). Each
    item's ``meta`` holds its crop and the applied parameters (:func:`true_kernel`); the
    crops are made once here for that (``random_crop``'s draws depend on the pixels).
    """
    from varlide.demo import photos_uint8

    if crops_per_photo < 1:
        raise ValueError(f"crops_per_photo: expected >= 1, got {crops_per_photo}")
    overrides = degradation_overrides(degradation, kernel_lengths)
    size = (int(size[0]), int(size[1]))
    n_photos = len(photos_uint8())
    items = []
    for seed in (int(s) for s in seeds):
        for i in range(crops_per_photo * n_photos):
            photo = photos_uint8()[i % n_photos][0]
            _, crop, rng = _synthetic_crop(seed, i, size)
            params = _applied(rng, overrides)
            items.append(EvalItem(
                f"s{seed}-{i:04d}_{photo}",
                (lambda s=seed, i=i, p=params: _synthetic_pair(s, i, size, p, quantize)),
                {"source": photo, "seed": seed, "index": i, "degradation": degradation,
                 **crop, **dataclasses.asdict(params)},
            ))
    return EvalSet(
        name or _preset_name("synthetic", degradation), True, items,
        description=f"demo-corpus degradations ({_parts(overrides)}) of {n_photos} "
                    f"photographs x {crops_per_photo} crops x {len(seeds)} seeds at "
                    f"{size[0]}x{size[1]}",
    )


def _preset_name(base: str, degradation: str) -> str:
    return base if degradation == "all" else f"{base}-{degradation}"


def _synthetic_crop(seed: int, index: int, size: tuple[int, int]):
    """Image ``(seed, index)``'s clean uint8 crop, its crop info, and its rng where
    ``degrade`` starts drawing (after ``random_crop``'s pixel-dependent number of draws)."""
    from varlide.demo import photos_uint8, random_crop

    photos = photos_uint8()
    rng = np.random.default_rng([seed, index])
    clean_u8, info = random_crop(photos[index % len(photos)][1], size, rng)
    return clean_u8, info, rng


def _synthetic_pair(
    seed: int, index: int, size: tuple[int, int], params: Degradation, quantize: bool
):
    clean_u8, _, rng = _synthetic_crop(seed, index, size)
    clean = clean_u8.astype(np.float32) / np.float32(255.0)
    return _degraded(clean, rng, params, quantize), clean


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
    degradation: str = "all",
    kernel_lengths: Sequence[int] | None = None,
) -> EvalSet:
    """Well-exposed images of a folder as pseudo-references, degraded like the demo corpus.

    ``rel_paths``: the candidates (e.g. ``holdout.split_corpus(folder)[1]``; default: every
    image under ``uri``); ``brightness``: the mean-luma range of a usable reference;
    ``max_side``: references are area-downscaled to this long side first (it also averages
    JPEG artefacts away; None = full size); ``limit``: at most this many references (a
    deterministic subset, see ``_select``). Each reference is degraded once per seed with
    ``np.random.default_rng([seed, h])``, ``h`` a hash of its relative path.
    ``degradation`` / ``kernel_lengths``: a :data:`DEGRADATIONS` preset, as
    :func:`paired_synthetic` (the name gets ``-<preset>`` unless ``all``); ``meta`` holds
    the applied parameters (:func:`true_kernel`).
    """
    from varlide.storage.uri import join

    overrides = degradation_overrides(degradation, kernel_lengths)
    chosen = _select(uri, rel_paths, brightness, limit, max_side)
    items = []
    for seed in (int(s) for s in seeds):
        for rel, y in chosen:
            key = int(_path_fraction(rel, 0) * 2**32)
            params = _applied(np.random.default_rng([seed, key]), overrides)

            def load(src=join(uri, rel), s=seed, key=key, p=params):
                clean = _read_image(src, max_side)
                return _degraded(clean, np.random.default_rng([s, key]), p, quantize), clean

            items.append(EvalItem(f"s{seed}-{rel}", load,
                                  {"source": rel, "seed": seed, "ref_brightness": y,
                                   "degradation": degradation, **dataclasses.asdict(params)}))
    return EvalSet(
        name or _preset_name(_default_name(uri, "paired"), degradation), True, items,
        description=f"{len(chosen)} images of {uri} with mean luma in {brightness} as "
                    f"references, degraded ({_parts(overrides)}), x {len(seeds)} seeds, "
                    f"long side {max_side}",
    )


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


