"""The one resolver above the backends: from a Config to the concrete prior, the local
enhancer weights and every file a run needs; the checks before a run (``preflight``) and
before a worker builds models (``prepare_worker``); the rows of ``varlide weights list``.

It knows every backend (their file tables live beside them: ``varlide.iqa.files``,
``varlide.priors.clip_files``, ``varlide.models.files``) and the file mechanism
(``varlide.weights``); nothing below it imports it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from varlide.iqa.files import PYIQA_FILES, metric_files
from varlide.models import ENHANCERS
from varlide.models.files import enhancer_files, enhancers_with_default_weights, published_files
from varlide.priors import PRIORS
from varlide.priors.clip_files import (
    SUPPORTED_CLIP_MODELS,
    clip_checkpoint,
    registered_clip_checkpoints,
)
from varlide.weights import (
    Requirement,
    WeightFile,
    cache_dir,
    check,
    dedupe,
    hf_cache_dir,
    missing,
    package_dir,
    read_lock,
    read_remote_lock,
    set_offline,
    sync,
    torch_hub_dir,
)

if TYPE_CHECKING:
    from varlide.config import Config

Scale = tuple[str, str | None]  # (backend, model): a prior's scale

log = logging.getLogger(__name__)


def local_weights(weights: str | None) -> str | None:
    """``enhancer_weights`` as a model may read it: a ``models:/`` URI downloaded (once per
    worker, into the weights cache) to its folder; anything else as it is."""
    if weights and str(weights).startswith("models:/"):
        from varlide.registry_mlflow import resolve_model_uri

        return resolve_model_uri(str(weights))
    return weights


def trained_prior_of(cfg: Config) -> Scale | None:
    """The enhancer's trained prior without running it (``config.json`` of its weights, or
    the enhancer's own attributes); None with ``enhance: false`` or when unreadable."""
    if not cfg.enhance:
        return None
    folder = local_weights(cfg.enhancer_weights)
    if folder is None:
        candidate = package_dir() / cfg.enhancer
        folder = str(candidate) if (candidate / "config.json").is_file() else None
    if folder is not None:
        from varlide.storage.uri import filesystem, join

        uri = str(folder).rstrip("/")
        cfg_uri = (uri.rsplit("/", 1)[0] + "/config.json" if uri.endswith(".safetensors")
                   else join(uri, "config.json"))
        try:
            fs, path = filesystem(cfg_uri)
            meta = json.loads(fs.cat_file(path))
            return meta.get("trained_prior"), meta.get("trained_prior_model")
        except (FileNotFoundError, OSError, ValueError):
            return None
    try:
        from varlide.models.base import create_enhancer

        enh = create_enhancer(cfg.enhancer, device="cpu")
    except Exception:  # missing default weights etc.: reported by the weights check
        return None
    return (enh.trained_prior, enh.trained_prior_model) if enh.trained_prior else None


def use_cache(cfg: Config) -> None:
    """The config's weights cache for this process (``VARLIDE_WEIGHTS_CACHE``): set here,
    and only here, from a config."""
    if cfg.weights_cache:
        os.environ["VARLIDE_WEIGHTS_CACHE"] = cfg.weights_cache


def requirements(cfg: Config, *, include_reference: bool = False,
                 trained: tuple[str | None, str | None] | None = None,
                 with_calibration: bool = True) -> list[Requirement]:
    """Every file a config needs: the prior's, each pyiqa metric's, the enhancer's and (when
    the prior differs from the enhancer's trained one) the calibration's (optional unless
    ``prior_calibration`` names one)."""
    reqs: list[Requirement] = []
    backend, model = _prior_of(cfg, trained)
    files_of = PRIORS.info(backend).get("files")  # a prior's files: its registry metadata
    if files_of is not None:
        label, files = files_of(model)
        reqs += [Requirement(f, f"prior {backend} {label}") for f in files]
    names = list(cfg.metrics)
    if include_reference or cfg.reference:
        names += [m for m in cfg.reference_metrics if m not in names]
    for name in names:
        for f in metric_files(name) or ():
            reqs.append(Requirement(f, f"metric {name}"))
    if cfg.enhance:
        reqs += [Requirement(f, f"enhancer {cfg.enhancer}")
                 for f in enhancer_files(cfg.enhancer, local_weights(cfg.enhancer_weights))]
    if with_calibration:
        from varlide.priors.calibration import calibration_requirement

        req = calibration_requirement(cfg, trained_prior_of(cfg) if trained is None
                                      else trained)
        if req is not None:
            reqs.append(req)
    return dedupe(reqs)



def uncatalogued_metrics(cfg: Config, include_reference: bool = False) -> list[str]:
    """pyiqa metric names of the config whose files this registry does not know."""
    from varlide.iqa.base import metric_info

    names = list(cfg.metrics) + (list(cfg.reference_metrics)
                                 if include_reference or cfg.reference else [])
    out = []
    for n in dict.fromkeys(names):
        try:
            info = metric_info(n)
        except KeyError:
            continue
        if info.source == "pyiqa" and metric_files(n) is None:
            out.append(n)
    return out



_PREPARED: set[str] = set()

_SYNC_LOCK = threading.Lock()



def prepare_worker(cfg: Config, reqs: list[Requirement] | None = None) -> None:
    """Before a worker builds models (once per process and config): weights cache from the
    config, offline switches, a sync of the needed files (and calibrations) from
    ``weights_mirror``, then the check of every required file."""
    use_cache(cfg)
    set_offline(not cfg.weights_online)
    marker = f"{cfg.model_dump_json()}|{cache_dir()}|{torch_hub_dir()}|{hf_cache_dir()}"
    with _SYNC_LOCK:
        if marker in _PREPARED:
            return
        if cfg.weights_mirror:
            remote = read_remote_lock(cfg.weights_mirror)["files"]
            needed = {r.file.key for r in requirements(cfg, with_calibration=False)}
            keys = [k for k in remote if k in needed or k.startswith("cache/calibrations/")]
            acts = sync(cfg.weights_mirror, keys=keys)
            n = sum(a.what == "synced" for a in acts)
            if n:
                log.info("weights: %d file(s) synced from %s", n, cfg.weights_mirror)
        check(requirements(cfg) if reqs is None else reqs, online=cfg.weights_online)
        _PREPARED.add(marker)



def _prior_of(cfg: Config, trained: Scale | None = None) -> tuple[str, str | None]:
    """(backend, prior_model) the config runs (``prior: auto`` resolved)."""
    if cfg.prior != "auto":
        return cfg.prior, cfg.prior_model
    from varlide.priors.calibration import resolve_auto_prior

    return resolve_auto_prior(cfg, trained_prior_of(cfg) if trained is None else trained)


def preflight(cfg: Config) -> list[Requirement]:
    """Before a run starts (CLI, dry run): a prior that can give what the config asks
    (``prior_local``: a backend with local maps, else ``ValueError``), and every required
    file present here, or listed in ``weights_mirror``'s lock file for workers to sync;
    else ``WeightsMissingError``."""
    use_cache(cfg)
    backend, _ = _prior_of(cfg)
    from varlide.priors.calibration import check_prior_options

    check_prior_options(cfg, backend)
    if cfg.enhance and ENHANCERS.info(cfg.enhancer).get("local_prior") and not cfg.prior_local:
        raise ValueError(f"enhancer {cfg.enhancer} reads the prior's local maps: set "
                         "prior_local: true (--prior-local) with a prior that has them")
    if cfg.prior_local:
        if not PRIORS.info(backend).get("local"):
            raise ValueError(f"prior_local: the {backend} prior has no local maps (priors "
                             f"with them: {', '.join(PRIORS.names_where('local'))})")
    reqs = requirements(cfg)
    gone = missing(reqs)
    if gone and cfg.weights_mirror:
        mirrored = set(read_remote_lock(cfg.weights_mirror)["files"])
        gone = [r for r in gone if r.file.key not in mirrored]
    if cfg.weights_online:
        gone = [r for r in gone if not r.file.url]
    check(gone)
    return reqs



def describe(reqs: Iterable[Requirement]) -> list[dict[str, Any]]:
    """Rows for ``varlide weights list`` / ``--dry-run``: what, where, present, locked."""
    lock = read_lock()["files"]
    rows = []
    for r in reqs:
        path = r.file.path()
        entry = lock.get(r.file.key or "", {})
        rows.append({
            "used_by": r.used_by, "kind": r.file.kind, "key": r.file.key or r.file.location,
            "path": str(path), "present": path.is_file(), "optional": r.optional,
            "size": path.stat().st_size if path.is_file() else None,
            "sha256": entry.get("sha256"), "source": r.file.url,
        })
    return rows



def catalogue() -> list[Requirement]:
    """Every file this registry knows by name: the supported CLIP models' checkpoints, each
    catalogued pyiqa metric's files, the enhancers' default weights, stored calibrations."""
    reqs = [Requirement(f, f"metric {name}", optional=True)
            for name, files in PYIQA_FILES.items() for f in files]
    for spec in SUPPORTED_CLIP_MODELS:
        arch, tag = spec.split(":", 1)
        try:
            reqs.append(Requirement(clip_checkpoint(arch, tag), f"prior clip {spec}", True))
        except ValueError:  # not in this open_clip version
            continue
    reqs += [Requirement(f, f"prior clip {a}:{t}", True)
             for (a, t), f in registered_clip_checkpoints().items()]
    for name in enhancers_with_default_weights():
        reqs += [Requirement(f, f"enhancer {name}", True) for f in enhancer_files(name, None)]
    reqs += [Requirement(f, f"enhancer {name} (upstream release)", True)
             for name, f in published_files()]
    for p in sorted((cache_dir() / "calibrations").glob("*.json")):
        reqs.append(Requirement(WeightFile(f"cache:calibrations/{p.name}", None,
                                           "calibration"), "calibration", True))
    return dedupe(reqs)



def calibrations_state() -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of the stored calibrations: part of a worker's stage key, so a
    long-lived worker picks up a calibration made after it started (on the next run)."""
    folder = cache_dir() / "calibrations"
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                        if e.name.endswith(".json")))
