"""The one configuration object of a varlide run.

Precedence, lowest to highest: built-in defaults < YAML file (``--config``) < environment
(``VARLIDE_<FIELD>``, e.g. ``VARLIDE_SHARD_SIZE=64``) < CLI flags. Validation happens here,
at the edge, and an error names the offending field.

``Config.output_fields`` lists the fields that change what a run produces; the run id is a
hash of the input URI and those fields only (not workers, device, batch size ...), so
re-running the same command resumes the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from varlide.prompts import DEFAULT_CLIP_BLUR_PROMPTS, DEFAULT_CLIP_VISIBILITY_PROMPTS

DEFAULT_METRICS = (
    "brightness",
    "contrast",
    "entropy",
    "colorfulness",
    "sharpness",
    "overexposed",
    "piqe",
)
DEFAULT_REFERENCE_METRICS = ("psnr", "ssim")

class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class Config(BaseModel):
    """Everything a run needs to know. Immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- corpus and plan (change outputs) ---
    dataset: str | None = Field(None, description="dataset name; default: last path part of INPUT")
    shard_size: int = Field(256, ge=1, le=1_000_000)
    include: tuple[str, ...] = Field((), description="glob(s) on the relative path to keep")
    exclude: tuple[str, ...] = Field((), description="glob(s) on the relative path to drop")
    limit: int | None = Field(None, ge=1)
    # --- stages (change outputs) ---
    prior: str = Field("analytic", description="prior backend, or 'auto': the enhancer's own")
    prior_model: str | None = Field(None, description="backend model, e.g. 'ViT-B-32:openai'")
    prior_calibration: str | None = Field(None, description="calibration file onto the "
                                          "enhancer's trained prior scale")
    prior_options: dict[str, Any] = Field(
        default_factory=dict, description="the prior backend's own settings, e.g. "
        "qinstruct / qrealign {precision: bf16, max_batch: 4}")
    prior_local: bool = Field(False, description="also store the prior's local maps "
                              "(qinstruct: visibility, contrast, sharpness on a 4x4 grid) "
                              "in the prior_local column")
    clip_visibility_prompts: tuple[tuple[str, str], ...] = Field(
        DEFAULT_CLIP_VISIBILITY_PROMPTS, min_length=1,
        description="clip prior: [bright, dark]-style pairs; v = P(first), pair mean")
    clip_blur_prompts: tuple[tuple[str, str], ...] = Field(
        DEFAULT_CLIP_BLUR_PROMPTS, min_length=1,
        description="clip prior: [blurry, sharp]-style pairs; b = P(first), pair mean")
    enhancer: str = Field("varlide-lite", description="registered enhancer; varlide-lite "
                          "runs its shipped weights unless enhancer_weights is set")
    enhancer_weights: str | None = Field(None, description="path/URI of enhancer weights")
    enhancer_options: dict[str, Any] = Field(
        default_factory=dict, description="enhancer keyword options, e.g. varlide-lite routing "
        "{skip_visibility: [0.87, 0.97], full_blur: 0.3}, its backbone slot {backbone: "
        "identity|denoise}, {downscale: 4}; classic-curve {backbone: denoise}")
    enhance: bool = Field(True, description="False: scores only, no enhanced images")
    metrics: tuple[str, ...] = DEFAULT_METRICS
    reference_metrics: tuple[str, ...] = DEFAULT_REFERENCE_METRICS
    reference: str | None = Field(None, description="URI of clean images, same relative paths")
    iqa_max_side: int | None = Field(None, ge=16)
    format: Literal["same", "png", "jpeg"] = "same"
    quality: int = Field(90, ge=1, le=100)
    apply_exif: bool = False
    max_pixels: int = Field(120_000_000, ge=1, description="decompression-bomb guard")
    # --- execution (do not change outputs) ---
    run_id: str | None = None
    workers: int = Field(1, ge=1, le=256, description="shards in flight on this machine")
    dask: str | None = Field(None, description="run shards on Dask: a scheduler address "
                             "(tcp://host:8786) or 'local:N' (N worker processes here)")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op "
                                      "threads per process (set once; default: torch's)")
    device: Literal["cpu", "cuda", "auto"] = "auto"
    batch_size: int = Field(8, ge=1, le=4096)
    decode_threads: int = Field(4, ge=1, le=256)
    memory_budget: int | None = Field(None, ge=0, description="bytes one shard in flight "
                                      "may hold in images and working tensors (e.g. '2GB'; "
                                      "'off' = 0: no bound, whole frames); default: half the "
                                      "available memory shared among the shards in flight, "
                                      "at most 1 GB (varlide/memory.py)")
    retries: int = Field(2, ge=0, le=20)
    retry_delay_s: float = Field(2.0, ge=0)
    image_timeout_s: float | None = Field(300.0, gt=0, description="seconds one file's read "
                                          "+ decode may run; past it the file is an error "
                                          "row 'timed out' and the shard goes on (None: no "
                                          "limit)")
    batch_timeout_s: float | None = Field(1800.0, gt=0, description="seconds one batch's "
                                          "prior + enhancer + measures may run; past it its "
                                          "images are error rows 'timed out' (None: no limit)")
    experiment: str = "varlide-enhance"
    progress: bool = True
    # --- weights (do not change outputs; varlide/weights.py) ---
    weights_cache: str | None = Field(None, description="varlide's weights cache (CLIP files, "
                                      "calibrations, lock file); default ~/.cache/varlide")
    weights_mirror: str | None = Field(None, description="URI a worker syncs its weights from "
                                       "at start-up (written by `varlide weights mirror`)")
    weights_online: bool = Field(False, description="let workers download missing weights "
                                 "(default: offline, a missing file is an error)")

    @field_validator("clip_visibility_prompts", "clip_blur_prompts", mode="before")
    @classmethod
    def _prompt_pairs(cls, value: Any) -> Any:
        if isinstance(value, str):  # env: VARLIDE_CLIP_BLUR_PROMPTS='[["blurry", "sharp"]]'
            value = json.loads(value)
        if isinstance(value, list | tuple):
            return tuple(tuple(p) if isinstance(p, list | tuple) else p for p in value)
        return value

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        from varlide.memory import MIN_BUDGET, parse_size

        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "unbounded"):
            return 0
        size = parse_size(value)
        if 0 < size < MIN_BUDGET:
            raise ValueError(f"at least {MIN_BUDGET >> 20} MB (or 'off'), got {value!r}")
        return size

    @field_validator("image_timeout_s", "batch_timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
            return None
        return value

    @field_validator("dask")
    @classmethod
    def _dask_target(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value.startswith("local:"):
            n = value.removeprefix("local:")
            if not n.isdigit() or not 1 <= int(n) <= 1024:
                raise ValueError(f"'local:N' needs a worker count N in 1..1024, got {value!r}")
            return f"local:{int(n)}"
        if value.startswith("local") or not re.fullmatch(r"([a-z0-9+]+://)?[^\s/]+:\d+", value):
            raise ValueError(f"expected a scheduler address (tcp://host:8786) or 'local:N', "
                             f"got {value!r}")
        return value

    @field_validator("include", "exclude", "metrics", "reference_metrics", mode="before")
    @classmethod
    def _to_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v for v in (p.strip() for p in value.split(",")) if v)
        if isinstance(value, list):
            return tuple(value)
        return value

    # Fields whose value changes what a run writes; everything else is execution detail.
    output_fields: ClassVar[tuple[str, ...]] = (
        "dataset", "shard_size", "include", "exclude", "limit", "prior", "prior_model",
        "prior_calibration", "prior_options", "prior_local", "clip_visibility_prompts",
        "clip_blur_prompts", "enhancer",
        "enhancer_weights", "enhancer_options", "enhance", "metrics", "reference_metrics",
        "reference",
        "iqa_max_side", "format", "quality", "apply_exif", "max_pixels",
    )

    # Fields that decide which stages (prior, enhancer, measures) a worker builds.
    stage_fields: ClassVar[tuple[str, ...]] = (
        "prior", "prior_model", "prior_calibration", "prior_options", "prior_local",
        "clip_visibility_prompts", "clip_blur_prompts", "enhance", "enhancer",
        "enhancer_weights", "enhancer_options", "metrics", "reference_metrics",
    )

    def stage_config(self) -> str:
        """The stage-deciding fields as one canonical string (a worker's stage cache key;
        ``reference`` counts only as present or not: it adds the reference measures)."""
        data = self.model_dump(mode="json")
        key = {name: data[name] for name in self.stage_fields}
        key["reference"] = bool(self.reference)
        return json.dumps(key, sort_keys=True)

    def output_config(self) -> dict[str, Any]:
        """The output-changing fields, JSON-ready (tuples become lists)."""
        data = self.model_dump(mode="json")
        return {name: data[name] for name in self.output_fields}

    def run_id_for(self, input_uri: str) -> str:
        """Deterministic run id: same input and output-changing config -> same id (resume).

        A run on an enhancer's shipped weights (no ``enhancer_weights``) also hashes those
        weights' ``config.json`` (weights sha256, architecture, backbone slot), so an upgrade
        that changes them starts a new run instead of resuming into rows of the old ones; the
        row schema version is hashed for the same reason (a run's shards share one layout)."""
        if self.run_id:
            return self.run_id
        from varlide.storage.results import SCHEMA_VERSION  # lazy: pyarrow only when needed

        body: dict[str, Any] = {"input": input_uri.rstrip("/"), "config": self.output_config(),
                                "schema_version": SCHEMA_VERSION}
        shipped = shipped_weights_id(self.enhancer) if (
            self.enhance and self.enhancer_weights is None) else None
        if shipped:
            body["shipped_weights"] = shipped
        payload = json.dumps(body, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def dataset_for(self, input_uri: str) -> str:
        """The dataset name: configured, else the last path component of the input."""
        if self.dataset:
            return self.dataset
        name = input_uri.rstrip("/").rsplit("/", 1)[-1]
        return name or "dataset"

    def quality_metric_names(self) -> tuple[str, ...]:
        """All q_ metric names of a run: no-reference ones, plus full-reference when given."""
        names = list(self.metrics)
        if self.reference:
            names += [m for m in self.reference_metrics if m not in names]
        return tuple(names)


@functools.lru_cache(maxsize=16)
def shipped_weights_id(enhancer: str) -> str | None:
    """sha256 prefix of the packaged ``varlide/models/shipped/<enhancer>/config.json``; None
    when the enhancer ships no weights (``classic-curve``)."""
    path = Path(__file__).resolve().parent / "models" / "shipped" / enhancer / "config.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Defaults < YAML file < VARLIDE_* environment < ``overrides`` (CLI flags; None = unset)."""
    return load_settings(Config, path, overrides, environ=environ)


S = TypeVar("S")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file: a mapping at the top level (ConfigError otherwise)."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return loaded


def load_settings(cls: type[S], source: str | Path | dict[str, Any] | None = None,
                  overrides: dict[str, Any] | None = None, *, section: str | None = None,
                  env_prefix: str | None = None, environ: dict[str, str] | None = None) -> S:
    """The one loader of every settings object: the run's ``Config`` and the typed sections
    (``TrainConfig``, ``GateConfig``, ``EvalConfig``, ``EvalRunConfig``).

    Defaults < ``source`` (a YAML path, or its already-read mapping; with ``section``, that
    key of it) < environment (``VARLIDE_<FIELD>``, or ``VARLIDE_<SECTION>_<FIELD>``, or
    ``env_prefix`` + ``<FIELD>``) <
    ``overrides`` (CLI flags; None = unset). Values are coerced to the field types; an
    unknown field or a bad value is a ``ConfigError`` naming it."""
    data: dict[str, Any] = {}
    doc = read_yaml(source) if isinstance(source, str | Path) else dict(source or {})
    if section is not None:
        doc = doc.get(section) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{section}: expected a mapping of field: value")
    data.update(doc)
    names = _field_names(cls)
    prefix = env_prefix or (f"VARLIDE_{section.upper()}_" if section else "VARLIDE_")
    env = dict(os.environ if environ is None else environ)
    data.update({n: env[prefix + n.upper()] for n in names if prefix + n.upper() in env})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    where = f"{section}." if section else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"invalid configuration: {where}{unknown[0]}: not a field "
                          f"(known: {', '.join(sorted(names))})")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{where}{'.'.join(str(p) for p in err['loc']) or (section or 'config')}: "
            f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def _field_names(cls: type) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return list(cls.model_fields)
