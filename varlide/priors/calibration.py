"""The scale contract of priors: calibrating one backend's v and b onto another's.

An enhancer learned its Θ_v, Θ_b on the v and b of one prior (``Enhancer.trained_prior``,
``trained_prior_model``). Another backend means another scale: CLIP's v of a dark frame is
not the analytic v of that frame. ``prior_for_run`` decides, once per worker:

- same backend (and model, when the enhancer recorded one): the prior as is; the row's
  ``prior_calibration`` is null (native scale);
- another one with a calibration (``prior_calibration: PATH``, else the one ``varlide
  calibrate`` stored for that pair in the weights cache): scores are mapped onto the
  trained scale; the row records the calibration id;
- another one without: the raw scores, a loud warning in the log, and
  ``uncalibrated: trained on <backend/model>`` in every row (``prior_scale_tags`` gives the
  MLflow tag of a run from its rows).

``prior: auto`` is the enhancer's recorded backend and model (``analytic`` without one).

A calibration is a monotone quantile map per score, fitted on a reference corpus scored by
both backends (``varlide calibrate``): the k/(K-1) quantiles (K = 101) of the source
scores become knots x_k, those of the target scores y_k; equal x knots (ties) are merged
(their y averaged), so x is strictly increasing and y non-decreasing; a score is mapped by
linear interpolation between knots, clamped at the ends. It therefore preserves order,
sends each reference quantile of the source onto the same quantile of the target, and
makes the mapped source distribution the target's on that corpus. Files are JSON
(``varlide-calibration-1``), stored beside the other weights (``cache:calibrations/...``)
so ``varlide weights mirror/sync`` carry them; the id is ``<src>-><tgt>@<sha12>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from varlide.priors.base import Prior, PriorScores, create_prior
from varlide.priors.clip_files import parse_clip_model
from varlide.weights import Requirement, WeightFile, location_path, record

if TYPE_CHECKING:
    import pyarrow as pa

    from varlide.config import Config
    from varlide.models.base import Enhancer

log = logging.getLogger(__name__)

FORMAT = "varlide-calibration-1"
KNOTS = 101
UNCALIBRATED = "uncalibrated: trained on "

Scale = tuple[str, str | None]  # (backend, model)


def prior_id(backend: str, model: str | None) -> str:
    return f"{backend}/{model}" if model else backend


def parse_prior_id(text: str) -> Scale:
    """``analytic`` / ``analytic/analytic-v1`` / ``clip/ViT-B-32:openai`` -> (backend, model)."""
    backend, _, model = text.partition("/")
    return backend, (model or None)


# --------------------------------------------------------------------------- the map


@dataclass(frozen=True)
class QuantileMap:
    """Piecewise-linear monotone map through knots (x strictly increasing, y non-decreasing)."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, knots: int = KNOTS) -> QuantileMap:
        source = np.asarray(source, dtype=np.float64).ravel()
        target = np.asarray(target, dtype=np.float64).ravel()
        source, target = source[np.isfinite(source)], target[np.isfinite(target)]
        if source.size < 2 or target.size < 2:
            raise ValueError("a calibration needs at least 2 finite scores per backend")
        qs = np.linspace(0.0, 1.0, knots)
        xq, yq = np.quantile(source, qs), np.quantile(target, qs)
        xs, ys = [], []
        i = 0
        while i < len(xq):  # merge ties in x (a flat run of source scores)
            j = i
            while j + 1 < len(xq) and xq[j + 1] <= xq[i]:
                j += 1
            xs.append(float(xq[i]))
            ys.append(float(np.mean(yq[i:j + 1])))
            i = j + 1
        ys = np.maximum.accumulate(np.asarray(ys)).tolist()
        return cls(tuple(xs), tuple(ys))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        v = values.float()
        xp = torch.tensor(self.x, dtype=torch.float32, device=v.device)
        fp = torch.tensor(self.y, dtype=torch.float32, device=v.device)
        if xp.numel() == 1:
            return fp.expand_as(v).clone()
        vc = v.clamp(xp[0], xp[-1])
        idx = torch.searchsorted(xp, vc.contiguous(), right=True).clamp(1, xp.numel() - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        t = ((vc - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
        return (y0 + t * (y1 - y0)).clamp(0, 1)

    def as_json(self) -> dict[str, list[float]]:
        return {"x": list(self.x), "y": list(self.y)}


@dataclass(frozen=True)
class Calibration:
    source: Scale
    target: Scale
    visibility: QuantileMap
    blur: QuantileMap
    images: int = 0
    reference: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def digest(self) -> str:
        body = json.dumps({"source": list(self.source), "target": list(self.target),
                           "visibility": self.visibility.as_json(),
                           "blur": self.blur.as_json()}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    @property
    def id(self) -> str:
        return f"{prior_id(*self.source)}->{prior_id(*self.target)}@{self.digest}"

    def apply(self, scores: PriorScores) -> PriorScores:
        return PriorScores(visibility=self.visibility(scores.visibility),
                           blur=self.blur(scores.blur))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "id": self.id,
            "source": {"backend": self.source[0], "model": self.source[1]},
            "target": {"backend": self.target[0], "model": self.target[1]},
            "visibility": self.visibility.as_json(), "blur": self.blur.as_json(),
            "knots": KNOTS, "images": self.images, "reference": self.reference,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a varlide calibration (format {data.get('format')!r})")
        return cls(
            source=(data["source"]["backend"], data["source"].get("model")),
            target=(data["target"]["backend"], data["target"].get("model")),
            visibility=QuantileMap(tuple(data["visibility"]["x"]), tuple(data["visibility"]["y"])),
            blur=QuantileMap(tuple(data["blur"]["x"]), tuple(data["blur"]["y"])),
            images=int(data.get("images", 0)), reference=data.get("reference"),
            created_at=data.get("created_at", ""),
        )

    def save(self, uri: str | Path) -> str:
        from varlide.storage.uri import write_bytes

        write_bytes(str(uri), (json.dumps(self.to_json(), indent=1) + "\n").encode())
        return str(uri)

    @classmethod
    def load(cls, uri: str | Path) -> Calibration:
        from varlide.storage.uri import filesystem

        fs, path = filesystem(str(uri))
        return cls.from_json(json.loads(fs.cat_file(path)))


def fit_calibration(source: Scale, target: Scale, source_v: np.ndarray, source_b: np.ndarray,
                    target_v: np.ndarray, target_b: np.ndarray, reference: str | None = None,
                    knots: int = KNOTS) -> Calibration:
    """Quantile maps of v and b from ``source``'s scores onto ``target``'s (same images)."""
    return Calibration(source=source, target=target,
                       visibility=QuantileMap.fit(source_v, target_v, knots),
                       blur=QuantileMap.fit(source_b, target_b, knots),
                       images=int(np.asarray(source_v).size), reference=reference)


# --------------------------------------------------------------------------- run side


class CalibratedPrior(Prior):
    """A prior plus its relation to the enhancer's trained scale (``calibration``: the row's
    ``prior_calibration`` value). Scores are mapped when a calibration is given."""

    def __init__(self, inner: Prior, calibration: Calibration | None = None,
                 note: str | None = None) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.model = inner.model
        self.map = calibration
        self.calibration = calibration.id if calibration is not None else note

    def score(self, images: torch.Tensor) -> PriorScores:
        scores = self.inner.score(images)
        return self.map.apply(scores) if self.map is not None else scores

    def score_with_maps(self, images: torch.Tensor) -> PriorScores:
        """v and b mapped as ``score``; the local maps stay the backend's own attribute
        scores (a calibration maps v and b only)."""
        scores = self.inner.score_with_maps(images)
        if self.map is None:
            return scores
        mapped = self.map.apply(scores)
        mapped.local = scores.local
        return mapped


def same_scale(backend: str, model: str | None, trained: Scale | None) -> bool:
    if trained is None or trained[0] is None:
        return True  # no trained scale (no enhancer, or one trained on any)
    return backend == trained[0] and (trained[1] is None or model == trained[1])


def resolve_auto_prior(cfg: Config, trained: Scale | None) -> Scale:
    """(backend, prior_model) a config runs: ``prior: auto`` = the enhancer's trained one."""
    if cfg.prior != "auto":
        return cfg.prior, cfg.prior_model
    if trained is None or not trained[0]:
        return "analytic", cfg.prior_model
    backend = trained[0]
    if cfg.prior_model is not None:
        return backend, cfg.prior_model
    model = trained[1]
    if backend == "clip" and model:  # 'ViT-B-32:openai+prompts-…' -> the model part
        model = model.split("+prompts-")[0]
        return backend, model
    if model and _files_of(backend) is not None and not model.startswith("folder:"):
        return backend, model  # a hub repo id (a folder's label names no path: the default)
    return backend, None


def prior_kwargs(cfg: Config, backend: str, model: str | None,
                 options: bool = True) -> dict[str, Any]:
    """The factory keywords of a prior: its model, the clip prompts and, for the run's own
    prior (``options``; not a calibration's target), the config's ``prior_options``."""
    extra = dict(cfg.prior_options) if options else {}
    if backend == "clip":
        return {"model": model, "visibility_prompts": cfg.clip_visibility_prompts,
                "blur_prompts": cfg.clip_blur_prompts, **extra}
    if model is not None and backend == "analytic":
        from varlide.priors.analytic import MODEL

        if model != MODEL:
            raise ValueError(f"prior_model {model!r}: the analytic prior has one model, {MODEL}")
    if _files_of(backend) is not None:  # a model-backed backend (qinstruct, qrealign ...)
        return {"model": model, **extra}
    return extra


def check_prior_options(cfg: Config, backend: str) -> None:
    """Refuse ``prior_options`` the backend's factory does not take, before a run starts."""
    import inspect

    from varlide.priors.base import PRIORS

    if not cfg.prior_options:
        return
    params = inspect.signature(PRIORS.get(backend)).parameters  # named keywords only
    known = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD} - {
        "device", "model", "visibility_prompts", "blur_prompts"}
    unknown = sorted(set(cfg.prior_options) - known)
    if unknown:
        raise ValueError(f"prior_options {unknown}: the {backend} prior takes "
                         f"{sorted(known) or 'none'}")


def _files_of(backend: str):
    """A backend's registry ``files`` function ((label, files) of a prior_model), or None."""
    import varlide.priors  # noqa: F401  (registers the built-in backends)
    from varlide.priors.base import PRIORS

    return PRIORS.info(backend).get("files") if backend in PRIORS else None


def run_scale(cfg: Config, trained: Scale | None) -> Scale:
    """(backend, model id) a config's prior will record, without building it."""
    backend, model = resolve_auto_prior(cfg, trained)
    if backend == "clip":
        from varlide.priors.clip import model_id

        return backend, model_id(parse_clip_model(model), cfg.clip_visibility_prompts,
                                 cfg.clip_blur_prompts)
    if backend == "analytic":
        from varlide.priors.analytic import MODEL

        return backend, MODEL
    files_of = _files_of(backend)
    if files_of is not None:  # the label its rows record, from the spec alone
        return backend, files_of(model)[0]
    return backend, model


def default_calibration_path(source: Scale, target: Scale) -> Path:
    return location_path(calibration_location(prior_id(*source), prior_id(*target)))


def calibration_location(source: str, target: str) -> str:
    """Where ``varlide calibrate`` stores the map from prior ``source`` onto ``target``
    (each ``backend/model``), beside the other weights so they are mirrored together."""
    def slug(s: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)

    return f"cache:calibrations/{slug(source)}--to--{slug(target)}.json"


def calibration_requirement(cfg: Config, trained: Scale | None) -> Requirement | None:
    """The calibration file a config needs (required when named, optional otherwise), or
    None when the prior is on the enhancer's ``trained`` scale (``varlide.resolver``
    finds it: ``trained_prior_of``) or there is none."""
    if trained is None:
        return None
    source = run_scale(cfg, trained)
    if same_scale(*source, trained):
        return None
    what = f"calibration {prior_id(*source)} -> {prior_id(*trained)}"
    if cfg.prior_calibration:
        uri = cfg.prior_calibration
        if "://" in uri and not uri.startswith("file://"):
            return None  # remote: read when the run starts, errors name it
        return Requirement(WeightFile(
            f"file:{Path(uri.removeprefix('file://')).expanduser().resolve()}", None,
            "calibration", note="made by `varlide calibrate`"), what)
    loc = calibration_location(prior_id(*source), prior_id(*trained))
    return Requirement(WeightFile(
        loc, None, "calibration", note="made by `varlide calibrate REFERENCE`"), what,
        optional=True)


_WARNED: set[tuple] = set()


def prior_for_run(cfg: Config, enhancer: Enhancer | None, device: str | torch.device
                  ) -> CalibratedPrior:
    """The prior of a run on ``device``, on the enhancer's trained scale when possible."""
    trained = None
    if enhancer is not None and getattr(enhancer, "trained_prior", None):
        trained = (enhancer.trained_prior, enhancer.trained_prior_model)
    backend, model = resolve_auto_prior(cfg, trained)
    prior = create_prior(backend, device=device, **prior_kwargs(cfg, backend, model))
    if same_scale(prior.backend, prior.model, trained):
        if cfg.prior_calibration:
            log.info("prior_calibration %s not applied: %s is the enhancer's trained scale",
                     cfg.prior_calibration, prior_id(prior.backend, prior.model))
        return CalibratedPrior(prior)
    source = (prior.backend, prior.model)
    if cfg.prior_calibration:
        cal = Calibration.load(cfg.prior_calibration)
    else:
        path = default_calibration_path(source, trained)
        cal = Calibration.load(path) if path.is_file() else None
    if cal is not None:
        if cal.source != source or not same_scale(cal.target[0], cal.target[1], trained):
            raise ValueError(
                f"calibration {cal.id} maps {prior_id(*cal.source)} onto "
                f"{prior_id(*cal.target)}, but this run needs {prior_id(*source)} onto "
                f"{prior_id(*trained)} (enhancer {cfg.enhancer})")
        log.info("prior %s calibrated onto %s (%s)", prior_id(*source), prior_id(*trained),
                 cal.id)
        return CalibratedPrior(prior, cal)
    note = UNCALIBRATED + prior_id(*trained)
    key = (source, trained)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(
            "PRIOR SCALE MISMATCH: enhancer %s was trained on %s scores but this run's prior "
            "is %s and no calibration exists (looked for %s); v and b go in on the wrong "
            "scale. Fix: `varlide calibrate REFERENCE --prior %s` or retrain the enhancer "
            "on this prior. Rows carry prior_calibration=%r.", cfg.enhancer,
            prior_id(*trained), prior_id(*source),
            cfg.prior_calibration or default_calibration_path(source, trained),
            prior.backend, note)
    return CalibratedPrior(prior, None, note=note)


def prior_scale_tags(table: pa.Table | Any) -> dict[str, str]:
    """MLflow tags of a run's prior scale from its rows (a pyarrow table or DataFrame):
    ``varlide.prior_calibration`` = the distinct values ('native' when all null), and
    ``varlide.prior_uncalibrated`` = 'true' when any row ran uncalibrated."""
    if table is None:
        return {}
    if hasattr(table, "column_names"):
        if "prior_calibration" not in table.column_names:
            return {}
        values = table.column("prior_calibration").to_pylist()
    else:
        if "prior_calibration" not in table:
            return {}
        values = list(table["prior_calibration"])
    distinct = sorted({v for v in values if isinstance(v, str) and v})
    tags = {"varlide.prior_calibration": ", ".join(distinct) if distinct else "native"}
    if any(v.startswith(UNCALIBRATED) for v in distinct):
        tags["varlide.prior_uncalibrated"] = "true"
    return tags


# --------------------------------------------------------------------------- calibrate


def score_corpus(priors: list[Prior], uri: str, cfg: Config, limit: int | None = None,
                 batch_size: int = 8, progress: bool = False) -> tuple[list[np.ndarray], int]:
    """v and b of every image under ``uri`` for each prior: ``[(N, 2) array per prior]``."""
    from varlide.imaging.decode import DecodeError, decode_image
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import filesystem, join

    files = list_corpus(uri, cfg.include, cfg.exclude, limit)
    out: list[list[np.ndarray]] = [[] for _ in priors]
    buckets: dict[tuple[int, int], list[np.ndarray]] = {}
    done = skipped = 0
    started = time.perf_counter()

    def flush(key: tuple[int, int]) -> None:
        arrays = buckets.pop(key)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            for i, p in enumerate(priors):
                s = p.score(batch)
                out[i].append(torch.stack([s.visibility, s.blur], 1).float().cpu().numpy())

    for f in files:
        try:
            fs, path = filesystem(join(uri, f.rel_path))
            img = decode_image(fs.cat_file(path), apply_exif=cfg.apply_exif,
                               max_pixels=cfg.max_pixels)
        except (DecodeError, OSError) as exc:
            skipped += 1
            log.warning("calibrate: skipped %s: %s", f.rel_path, exc)
            continue
        key = (img.height, img.width)
        buckets.setdefault(key, []).append(img.pixels)
        if len(buckets[key]) >= batch_size:
            flush(key)
        done += 1
        if progress and done % 50 == 0:
            print(f"calibrate: {done}/{len(files)} images "
                  f"({done / (time.perf_counter() - started):.1f} img/s)", flush=True)
    for key in list(buckets):
        flush(key)
    return [np.concatenate(o) if o else np.zeros((0, 2), np.float32) for o in out], skipped


def calibrate(reference_uri: str, cfg: Config, target: Scale | None,
              out: str | None = None, device: str | torch.device = "cpu",
              limit: int | None = None, batch_size: int = 8,
              progress: bool = False) -> tuple[Calibration, str]:
    """Fit and store the map from ``cfg``'s prior onto ``target`` (the caller's default:
    the enhancer's trained prior, ``varlide.resolver.trained_prior_of``) on the images under
    ``reference_uri``; returns it and where it went (default: the weights cache, recorded in
    the lock file so mirrors carry it)."""
    if target is None:
        raise ValueError("no target scale: pass --to BACKEND[/MODEL] or an enhancer "
                         "whose weights record their trained prior")
    if cfg.prior == "auto":
        raise ValueError("calibrate the backend you will run: --prior clip (not auto)")
    src = create_prior(cfg.prior, device=device, **prior_kwargs(cfg, cfg.prior, cfg.prior_model))
    t_backend, t_model = target
    t_kwargs: dict[str, Any] = {}
    if t_backend == "clip":
        t_kwargs = prior_kwargs(cfg, "clip", (t_model or "").split("+prompts-")[0] or None,
                                options=False)
    tgt = create_prior(t_backend, device=device, **t_kwargs)
    if not same_scale(tgt.backend, tgt.model, target):
        raise ValueError(f"the target prior built here records {prior_id(tgt.backend, tgt.model)}"
                         f", not {prior_id(*target)} (same prompts and model needed)")
    if same_scale(src.backend, src.model, target):
        raise ValueError(f"{prior_id(src.backend, src.model)} is already the target scale")
    (s, t), skipped = score_corpus([src, tgt], reference_uri, cfg, limit, batch_size, progress)
    if len(s) < 2:
        raise ValueError(f"{reference_uri}: {len(s)} usable image(s); a calibration needs more "
                         "(a few hundred of the kind you will run on)")
    cal = fit_calibration((src.backend, src.model), (tgt.backend, tgt.model), s[:, 0], s[:, 1],
                          t[:, 0], t[:, 1], reference=reference_uri)
    if out is None:
        loc = calibration_location(prior_id(*cal.source), prior_id(*cal.target))
        path = location_path(loc, for_write=True)
        cal.save(path)
        record([WeightFile(loc, None, "calibration")])
        out = str(path)
    else:
        cal.save(out)
    if skipped:
        log.warning("calibrate: %d unreadable image(s) skipped", skipped)
    return cal, out
