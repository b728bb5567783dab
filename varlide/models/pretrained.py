"""The enhancers' weights format: ``model.safetensors`` + ``config.json`` in a folder or URI.

One place decides how weights are written, read, hashed and checked (``Pretrained``, mixed
into every trainable model: ``varlide-lite``, ``zero-dce``, the ``restorer``), so a model
module only declares its ``name`` and ``config_class``. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "varlide-enhancer-1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "shipped"


# --------------------------------------------------------------------------- weights I/O


def weights_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_weights_dir(name: str) -> Path:
    """Where the shipped default weights of enhancer ``name`` live in the package."""
    return WEIGHTS_DIR / name


def _read(uri: str) -> bytes:
    from varlide.storage.uri import filesystem  # lazy: models import only torch at load time

    fs, path = filesystem(uri)
    return fs.cat_file(path)


def _join(base: str, name: str) -> str:
    from varlide.storage.uri import join

    return join(base, name)


def _load_safetensors(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else is refused by name, and nothing is
    ever unpickled (a pickle or ``torch.save`` checkpoint can run code when loaded)."""
    from safetensors.torch import load

    if data[:1] == b"\x80" or data[:2] == b"PK":
        kind = "a pickle" if data[:1] == b"\x80" else "a zip archive (torch.save)"
        raise ValueError(f"{uri} is {kind}, not a safetensors file: varlide never loads "
                         "pickled checkpoints; convert it with safetensors.torch.save_file")
    try:
        return load(data)
    except Exception as exc:  # safetensors' own error types vary by version
        raise ValueError(f"{uri} is not a valid safetensors file: {exc}") from None


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                     what: str, cast_floats: bool = False) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the module's (ValueError
    naming the first differences): ``load_state_dict`` would cast dtypes silently.
    ``cast_floats``: a floating tensor stored at another float precision (a file converted
    to fp16) is accepted, ``load_state_dict`` casting it into the module's."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k, want in expected.items():
        got = state.get(k)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{k}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype and not (
                cast_floats and got.is_floating_point() and want.is_floating_point()):
            problems.append(f"{k}: dtype {got.dtype}, expected {want.dtype}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{what} do not fit the model: {'; '.join(problems[:5])}{more}")


def missing_default_weights(name: str) -> FileNotFoundError:
    path = default_weights_dir(name) / WEIGHTS_FILE
    return FileNotFoundError(
        f"{name}: the shipped default weights {path} are missing. Train them with "
        f"`varlide train DATA OUT --enhancer {name}` (e.g. DATA = ../shared/data/train-sice) "
        f"and copy OUT/final/ to {path.parent}/, or pass weights=PATH (--enhancer-weights)."
    )


class Pretrained:
    """``save_pretrained`` / ``from_pretrained`` for an nn.Module with a dataclass config.

    Subclasses set ``name``, ``config_class`` and keep their config in ``self.config``.
    """

    name: str
    config_class: ClassVar[type]
    config: Any
    version: str
    trained_prior: str | None
    trained_prior_model: str | None
    pretrained_info: dict[str, Any]

    def save_pretrained(self, out: str | Path, extra: dict[str, Any] | None = None) -> str:
        """Write ``model.safetensors`` + ``config.json`` under ``out`` (any fsspec URI);
        returns the version (sha256 prefix) and sets ``self.version`` to it."""
        from safetensors.torch import save


        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        data = save(state, metadata={"format": FORMAT, "enhancer": self.name})
        digest = weights_sha256(data)
        meta = {
            "format": FORMAT,
            "enhancer": self.name,
            "model": dataclasses.asdict(self.config),
            "trained_prior": self.trained_prior,
            "trained_prior_model": self.trained_prior_model,
            "sha256": digest,
            **(extra or {}),
        }
        from varlide.storage.uri import join, write_bytes  # the one writer (temp + rename)

        out = str(out)
        write_bytes(join(out, WEIGHTS_FILE), data)
        write_bytes(join(out, CONFIG_FILE), json.dumps(meta, indent=1, sort_keys=True).encode())
        self.version = digest[:12]
        self.pretrained_info = meta
        return self.version

    @classmethod
    def read_pretrained(cls, path_or_uri: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
        """(config.json as a dict, state dict, sha256) from a folder or a .safetensors file."""
        uri = str(path_or_uri).rstrip("/")
        if uri.startswith("models:/"):  # resolved above the models, once per worker
            raise ValueError(f"{uri}: an MLflow registry URI reaches a model as the folder "
                             "varlide.resolver.local_weights downloads it to")
        if uri.endswith(".safetensors"):
            weights_uri = uri
            config_uri = uri.rsplit("/", 1)[0] + "/" + CONFIG_FILE if "/" in uri else CONFIG_FILE
        else:
            weights_uri, config_uri = _join(uri, WEIGHTS_FILE), _join(uri, CONFIG_FILE)
        try:
            data = _read(weights_uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"{cls.name}: weights file not found: {weights_uri}") from None
        try:
            meta = json.loads(_read(config_uri))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{cls.name}: {CONFIG_FILE} not found beside the weights: {config_uri}"
            ) from None
        digest = weights_sha256(data)
        if meta.get("enhancer") != cls.name:
            raise ValueError(
                f"{weights_uri} holds weights of enhancer {meta.get('enhancer')!r}, "
                f"not {cls.name!r}"
            )
        if meta.get("sha256") and meta["sha256"] != digest:
            raise ValueError(
                f"{weights_uri}: sha256 {digest[:12]} does not match its config.json "
                f"({meta['sha256'][:12]}); the file is corrupt or was replaced"
            )
        return meta, _load_safetensors(data, weights_uri), digest

    @classmethod
    def config_from_meta(cls, meta: dict) -> Any:
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        model = meta.get("model", {})
        unknown = set(model) - known
        if unknown:
            raise ValueError(f"{cls.name}: unknown model config field(s) {sorted(unknown)}")
        return cls.config_class(**model)

    def prior_mismatch(self, backend: str, model: str | None) -> str | None:
        """A warning text when v/b come from another prior than training used, else None."""
        if self.trained_prior is None or (backend == self.trained_prior and (
                self.trained_prior_model is None or model == self.trained_prior_model)):
            return None
        return (f"{self.name} {self.version} was trained on prior {self.trained_prior} "
                f"({self.trained_prior_model}) scores, but is given {backend} ({model}) "
                "scores: calibrate that backend onto the trained scale or retrain on it")

    @classmethod
    def from_pretrained(cls, path_or_uri: str | Path, **inference: Any):
        """Load a folder / .safetensors written by ``save_pretrained``; ``inference`` are the
        model's own inference settings (routing, precision ...: its constructor keywords)."""
        meta, state, digest = cls.read_pretrained(path_or_uri)
        model = cls(cls.config_from_meta(meta), **inference)
        model._adopt(meta, state, digest)
        return model

    @classmethod
    def for_training(cls, options: dict[str, Any], init_from: str | None = None):
        """The trainer's fresh model: the config from ``options``; with ``init_from`` (a
        local folder) its weights loaded before step 0 (fine-tuning, same architecture)."""
        model = cls(cls.config_class(**options))
        if init_from:
            meta, state, digest = cls.read_pretrained(init_from)
            model._adopt(meta, state, digest)
        return model

    def _adopt(self, meta: dict, state: dict[str, torch.Tensor], digest: str) -> None:
        check_state_dict(self, state, f"{self.name} weights {digest[:12]}")
        self.load_state_dict(state, strict=True)
        self.version = digest[:12]
        self.trained_prior = meta.get("trained_prior")
        self.trained_prior_model = meta.get("trained_prior_model")
        self.pretrained_info = meta
