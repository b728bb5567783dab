"""The MLflow model registry side of the enhancer: register, resolve, aliases.

A weights folder (``save_pretrained``: ``model.safetensors`` + ``config.json``) is logged as
an MLflow *pyfunc* model whose only artifact is that folder (no pickled torch module, no
pt2 export), so

- ``mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)`` enhances a batch of
  (N, H, W, 3) images in [0, 1] (or uint8) with the model's own trained prior;
- :func:`resolve_model_uri` downloads a version's weights folder into the local cache
  (``$VARLIDE_WEIGHTS_CACHE/registry/<sha256 prefix>/``, verified by sha256) for
  ``from_pretrained`` — what ``varlide enhance --weights models:/NAME@champion`` uses
  (``Pretrained.read_pretrained`` resolves the ``models:/`` scheme through it).

URIs: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. The tracking and registry URI is
``varlide.tracking.tracking_uri()`` (``MLFLOW_TRACKING_URI``, default ``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

log = logging.getLogger(__name__)

SCHEME = "models:/"
CHAMPION = "champion"
ARTIFACT_NAME = "weights"  # the artifacts key of the weights folder in the pyfunc model
MODEL_NAME_IN_RUN = "enhancer"
TAG_SHA = "varlide.sha256"
TAG_VERSION = "varlide.weights_version"
TAG_ENHANCER = "varlide.enhancer"
TAG_SOURCE = "varlide.source"


def is_registry_uri(uri: str | os.PathLike | None) -> bool:
    return uri is not None and str(uri).startswith(SCHEME)


@dataclass(frozen=True)
class RegistryRef:
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else \
            f"{SCHEME}{self.name}/{self.version}"


def parse_model_uri(uri: str) -> RegistryRef:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (an error names the expected forms)."""
    if not is_registry_uri(uri):
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or "
                         "models:/NAME/VERSION)")
    rest = str(uri)[len(SCHEME):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return RegistryRef(name, alias=alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return RegistryRef(name, version=version)
    raise ValueError(f"bad registry URI {uri!r}: expected models:/NAME@ALIAS or "
                     "models:/NAME/VERSION")


def client():
    from mlflow.tracking import MlflowClient

    from varlide.tracking import tracking_uri

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _use_tracking_uri() -> None:
    from varlide.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_registry_uri(tracking_uri())


# --------------------------------------------------------------------------- pyfunc


class VarlideEnhancerModel(PythonModel):
    """pyfunc wrapper: loads the weights folder artifact with ``create_enhancer``."""

    _skip_type_hint_validation = True  # no signature on purpose: images of any size

    def load_context(self, context) -> None:
        from varlide.models.base import create_enhancer
        from varlide.priors.base import create_prior

        folder = context.artifacts[ARTIFACT_NAME]
        meta = json.loads((Path(folder) / "config.json").read_text())
        self.enhancer = create_enhancer(meta["enhancer"], weights=folder, device="cpu")
        self.prior = create_prior(meta.get("trained_prior") or "analytic", device="cpu")

    def predict(self, context, model_input, params=None):
        import torch

        x = np.asarray(model_input)
        single = x.ndim == 3
        if single:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) images, got shape {x.shape}")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).clamp(0, 1)
        s = self.prior.score(t)
        y = self.enhancer.enhance(t, s.visibility, s.blur).images
        out = y.float().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return out[0] if single else out


def register_weights(folder: str | os.PathLike, name: str, *, run_id: str | None = None,
                     tags: dict[str, str] | None = None, description: str | None = None):
    """Log the weights folder as a pyfunc model (in MLflow run ``run_id`` when given) and
    register it as a new version of ``name``; returns the ``ModelVersion``."""
    folder = str(folder)
    meta = json.loads((Path(folder) / "config.json").read_text())
    _use_tracking_uri()
    from varlide import __version__

    vtags = {TAG_SHA: meta.get("sha256", ""), TAG_VERSION: (meta.get("sha256") or "")[:12],
             TAG_ENHANCER: meta.get("enhancer", ""), **(tags or {})}
    kwargs: dict[str, Any] = dict(
        name=MODEL_NAME_IN_RUN, python_model=VarlideEnhancerModel(),
        artifacts={ARTIFACT_NAME: folder}, registered_model_name=name,
        pip_requirements=[f"varlide=={__version__}"],  # no inference (no subprocess)
        metadata={"varlide": {k: meta.get(k) for k in (
            "enhancer", "sha256", "trained_prior", "trained_prior_model", "model")}},
    )
    if run_id is not None:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(**kwargs)
    else:
        info = mlflow.pyfunc.log_model(**kwargs)
    version = str(info.registered_model_version)
    c = client()
    for k, v in vtags.items():
        c.set_model_version_tag(name, version, k, str(v))
    if description:
        c.update_model_version(name, version, description=description)
    return c.get_model_version(name, version)


def get_alias(name: str, alias: str = CHAMPION):
    """The ``ModelVersion`` behind ``name@alias``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, version: str | int, alias: str = CHAMPION) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def resolve_version(uri: str):
    """The ``ModelVersion`` a ``models:/`` URI names (an error names the URI)."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    c = client()
    try:
        if ref.alias:
            return c.get_model_version_by_alias(ref.name, ref.alias)
        return c.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: not in the MLflow registry at "
                                f"{_redacted_tracking_uri()} ({exc.error_code})") from None


def pin_model_uri(uri: str) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (what the alias points at now)."""
    mv = resolve_version(uri)
    return RegistryRef(mv.name, version=str(mv.version)).uri


def _redacted_tracking_uri() -> str:
    from varlide.tracking import redact, tracking_uri

    return redact(tracking_uri())


def _cache_root() -> Path:
    from varlide.weights import cache_dir

    return cache_dir() / "registry"


def _find_weights(root: Path) -> Path:
    for cfg in sorted(root.rglob("config.json")):
        if (cfg.parent / "model.safetensors").is_file():
            return cfg.parent
    raise FileNotFoundError(f"no model.safetensors + config.json under {root}")


def resolve_model_uri(uri: str, cache: str | os.PathLike | None = None) -> str:
    """Download the weights folder of ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` into
    the local cache (once per weights sha256) and return that folder (for from_pretrained)."""
    from varlide.models.varlide_lite import weights_sha256

    mv = resolve_version(uri)
    sha = (mv.tags or {}).get(TAG_SHA) or ""
    root = Path(cache) if cache else _cache_root()
    if sha:
        dest = root / sha[:16]
        if (dest / "model.safetensors").is_file() and (dest / "config.json").is_file():
            if weights_sha256((dest / "model.safetensors").read_bytes()) == sha:
                return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=root))
    try:
        from varlide.tracking import tracking_uri

        _use_tracking_uri()
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp),
            tracking_uri=tracking_uri())
        found = _find_weights(tmp)
        digest = weights_sha256((found / "model.safetensors").read_bytes())
        if sha and digest != sha:
            raise ValueError(f"{uri} (version {mv.version}): downloaded weights have sha256 "
                             f"{digest[:12]}, the registry says {sha[:12]}")
        dest = root / digest[:16]
        if not (dest / "model.safetensors").is_file():
            staged = root / f".{digest[:16]}-{os.getpid()}"
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(found, staged)
            try:
                os.replace(staged, dest)
            except OSError:  # another process won the race
                shutil.rmtree(staged, ignore_errors=True)
        log.info("registry: %s -> version %s -> %s", uri, mv.version, dest)
        return str(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
