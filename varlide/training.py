"""The unsupervised enhancer trainer (library side; the Prefect flow ``train`` wraps it).

``train(corpus_uri, out_dir, TrainConfig(...))`` trains ``varlide-lite`` (or ``zero-dce``,
an ablation variant, the ``restorer``, or ``varlide-var``'s front end around its frozen VAR
backbone, ``init_from`` naming the backbone folder) on any image corpus URI, with no
reference images. The registered model class builds the model of step 0
(``for_training``); the optimiser holds only its trainable parameters.

Data
    Every image under ``corpus_uri`` (``varlide.storage.listing`` rules) is read once into
    memory as encoded bytes. The validation split is the one held-out rule
    (``varlide.holdout``): an image is held out when ``int(sha256(bytes)[:8], 16) / 2**32 <
    val_fraction`` (renaming or reordering files does not move it; the same photograph in two
    folders lands on the same side), capped at ``val_max`` images (the lowest hashes). On
    train-sice (33 % dark, 27 % moderate, 39 % bright) the default (5 %, at most 48) holds
    out 48 images: 16 dark, 14 moderately lit, 18 bright by the mean luma of the degraded
    crop;
    ``TrainResult.split`` reports the counts by class and the held-out paths.
Batches
    Step ``s`` draws its batch from ``numpy.random.default_rng([seed, s])``: ``batch_size``
    images, a random crop of ``crop`` px of a copy rescaled by a random factor in
    ``scale`` (so content scale varies), a random horizontal flip, then the paper's
    degradation (``varlide.demo.degrade``): motion blur 1-15 px at a random angle (about a
    third nearly sharp), Poisson-Gaussian noise, and with probability ``darken_prob`` (for a
    crop whose mean luma is above 0.3) the demo's darkening (gamma 1-2, exposure 0.05-0.3),
    otherwise the photograph's own exposure (train-sice holds dark *and* over-exposed
    images: the curve must learn to brighten and to darken). The prior (``analytic`` by
    default) scores the *augmented* crop, so Theta_v and Theta_b see the v and b they will
    be given at inference. Batches are made in a background thread, ahead of the step.
    A resumed run draws the same batches as an uninterrupted one.
Paired models
    An enhancer registered ``paired`` (the ``restorer``, the learned deblurring stage) trains
    on (degraded, clean) pairs made the same way from the same crops, by
    ``varlide.demo.blur_pair``: motion blur 1..``kernel_max`` px (a ``trajectory_prob`` share
    random camera-shake trajectories, else straight lines), the demo's Poisson-Gaussian
    noise, the 8-bit grid. The clean crop travels with the batch and reaches the loss
    (``restore``) as ``out["reference"]``; the held-out crops become such pairs too, and
    validation reports ``val/psnr_paired`` against ``val/psnr_paired_input``. Its registry
    entry's ``train_defaults`` (lr, crop, batch size ...) apply unless the config names them
    (``train_defaults()``).
Optimisation
    Adam (``lr``, ``weight_decay``), gradient-norm clip, a cosine learning-rate decay to
    ``lr * lr_final``, a linear warm-up; VICM's soft truncation mask with its temperature
    annealed geometrically from ``temperature[0]`` to ``temperature[1]``. bf16 autocast on
    CUDA (``amp``); float32 on CPU.
Checkpoints
    Every ``checkpoint_every`` steps under ``out_dir/checkpoints/step-NNNNNNN/``:
    ``model.safetensors`` + ``config.json`` (``save_pretrained``), ``optimizer.safetensors``
    (Adam's tensors) and ``state.json`` (step, Adam's hyper-parameters, curves, the
    train config), written last: a checkpoint without ``state.json`` is ignored. A new call
    with the same ``out_dir`` resumes from the newest complete checkpoint (``steps`` may be
    raised; any other change of the training config is an error). Only the newest
    ``keep_checkpoints`` are kept. ``out_dir`` may be any fsspec URI.
Result
    ``out_dir/final/`` (the weights, loadable by ``from_pretrained``, with a ``training``
    record in config.json) and ``out_dir/curves.json``; :class:`TrainResult`.

Callbacks: ``on_metrics(step, {name: value})`` every ``log_every`` steps (train terms,
``lr``, ``temperature``, ``steps_per_s``) and after each validation (``val/...``);
``on_checkpoint(step, uri)`` after each checkpoint and for the final weights
(``step`` = final step, ``uri`` = ``out_dir/final``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from varlide import holdout
from varlide.devices import resolve_device
from varlide.models.base import autocast_for
from varlide.priors.analytic import LUMA_601

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, str], None]

BRIGHTNESS_BINS = (("dark", 0.0, 0.25), ("mid", 0.25, 0.5), ("bright", 0.5, 1.01))
# Fields that may differ between a run and its resume (execution, schedule length, logging).
RESUMABLE_FIELDS = frozenset({
    "steps", "checkpoint_every", "keep_checkpoints", "val_every", "log_every", "device",
    "threads", "prefetch", "final_backbone", "final_inference_downscale",
})


@dataclass
class TrainConfig:
    """Everything a training run needs. Plain data (JSON-ready via ``asdict``)."""

    enhancer: str = "varlide-lite"  # a trainable registered enhancer (trainable_enhancers())
    model: dict[str, Any] = field(default_factory=dict)  # VarlideLiteConfig / ZeroDCEConfig
    loss: str = "varlide"  # "varlide" | "zero-dce"
    loss_weights: dict[str, float] = field(default_factory=dict)  # overrides of the defaults
    loss_options: dict[str, Any] = field(default_factory=dict)  # ed_mode, entropy_sign, ...
    prior: str = "analytic"
    steps: int = 800
    batch_size: int = 16
    crop: int = 64
    scale: tuple[float, float] = (0.5, 1.0)
    darken_prob: float = 0.25
    blur_prob: float = 1.0  # 1 = the demo's mix (about a third nearly sharp)
    noise: bool = True
    # paired models (the restorer): blur lengths 1..kernel_max px, this share random
    # trajectories (else straight lines); varlide.demo.blur_pair
    kernel_max: int = 23
    trajectory_prob: float = 0.5
    lr: float = 5e-3
    lr_final: float = 0.05  # final lr as a fraction of lr (cosine)
    warmup: int = 50
    weight_decay: float = 1e-4
    grad_clip: float = 0.5
    mask: str = "soft"  # VICM truncation in training: soft | ste
    temperature: tuple[float, float] = (1.0, 0.05)
    val_fraction: float = holdout.FRACTION
    val_max: int = holdout.LIMIT
    val_crop: int = 128
    val_every: int = 200
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 25
    seed: int = 0
    overfit_batches: int = 0  # > 0: cycle through only this many batches (debugging/tests)
    max_images: int | None = None
    device: str = "auto"
    amp: bool = True
    threads: int | None = None  # torch intra-op threads (None = torch's default)
    prefetch: int = 3
    init_from: str | None = None  # a from_pretrained folder/URI loaded before step 0
    # varlide-lite: the backbone slot the final weights name (None: the one trained with,
    # ``model.backbone``, empty by default). The shipped weights were trained with the slot
    # empty and run with the denoiser after the curve; this default makes trained weights
    # run the same way.
    final_backbone: str | None = "denoise"
    # varlide-lite: the 1/k copy the final weights estimate their curve maps on at inference
    # (``VarlideLiteConfig.inference_downscale``; None: as trained). 4 as the shipped weights:
    # no quality cost measured, 12x less curve-net work (docs/METHOD.md).
    final_inference_downscale: float | None = 4.0

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        self.temperature = tuple(self.temperature)
        from varlide.losses import LOSSES

        if self.enhancer not in trainable_enhancers():
            raise ValueError(f"enhancer: one of {trainable_enhancers()} (trainable), got "
                             f"{self.enhancer!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.final_inference_downscale is not None and self.final_inference_downscale < 1:
            raise ValueError(f"final_inference_downscale: None or >= 1, got "
                             f"{self.final_inference_downscale!r}")
        from varlide.models.backbones import backbone_names

        if self.final_backbone is not None and self.final_backbone not in backbone_names():
            raise ValueError(f"final_backbone: None or one of {backbone_names()}, got "
                             f"{self.final_backbone!r}")
        for name in ("steps", "batch_size", "crop", "checkpoint_every", "log_every",
                     "val_every", "val_crop", "keep_checkpoints", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.crop < 16 or self.val_crop < 16:
            raise ValueError(f"crop / val_crop: expected >= 16 px, got {self.crop}, "
                             f"{self.val_crop}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale: expected 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected in [0, 1), got {self.val_fraction}")
        if self.kernel_max < 1 or not 0 <= self.trajectory_prob <= 1:
            raise ValueError(f"kernel_max >= 1 and trajectory_prob in [0, 1], got "
                             f"{self.kernel_max}, {self.trajectory_prob}")
        if self.mask not in ("soft", "ste"):
            raise ValueError(f"mask: 'soft' or 'ste', got {self.mask!r}")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class TrainResult:
    weights_uri: str  # out_dir/final (a from_pretrained folder)
    version: str  # sha256 prefix of the final weights
    steps: int
    resumed_from: int | None
    seconds: float
    steps_per_s: float
    curves: dict[str, list[float]]  # step, loss, each term, lr, temperature
    val_curves: dict[str, list[float]]  # step, val/...
    split: dict[str, Any]
    checkpoints: list[str]


# --------------------------------------------------------------------------- data


@dataclass
class _Image:
    rel_path: str
    data: bytes
    sha256: str


def _read_corpus(corpus_uri: str, max_images: int | None) -> list[_Image]:
    from varlide.storage.listing import list_corpus
    from varlide.storage.uri import filesystem, join

    files = list_corpus(corpus_uri, limit=max_images)
    if not files:
        raise ValueError(f"no images found under {corpus_uri}")

    def read(f):
        fs, path = filesystem(join(corpus_uri, f.rel_path))
        data = fs.cat_file(path)
        return _Image(f.rel_path, data, hashlib.sha256(data).hexdigest())

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(read, files))


def _decode_u8(data: bytes) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # a broken file is skipped, never fatal for training
        log.warning("training: undecodable image skipped (%s)", exc)
        return None


def _luma_mean(x: np.ndarray) -> float:
    r, g, b = LUMA_601  # the one Rec.601 definition (varlide.priors.analytic)
    return float((x[..., 0] * r + x[..., 1] * g + x[..., 2] * b).mean())


def _bin(mean: float) -> str:
    for name, lo, hi in BRIGHTNESS_BINS:
        if lo <= mean < hi:
            return name
    return "bright"


def _random_crop(img: np.ndarray, size: int, scale: tuple[float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """A ``size`` px float32 crop of ``img`` (uint8 HWC) rescaled by a factor in ``scale``."""
    h, w = img.shape[:2]
    s = rng.uniform(*scale)
    side = min(int(round(size / s)), h, w)
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    flip = rng.random() < 0.5
    region = img[y0:y0 + side, x0:x0 + side]
    t = torch.from_numpy(np.array(region)).permute(2, 0, 1)[None].float() / 255
    if side != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=side > size)
    out = t[0].permute(1, 2, 0).clamp(0, 1).numpy()
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def is_paired(enhancer: str) -> bool:
    """Whether ``enhancer`` trains on (degraded, clean) pairs (its ``paired`` metadata): the
    restorer does; the curve models learn without references."""
    from varlide.models import ENHANCERS

    return bool(ENHANCERS.info(enhancer).get("paired"))


def train_defaults(enhancer: str) -> dict[str, Any]:
    """TrainConfig fields an enhancer trains with unless told otherwise (its registry's
    ``default_loss`` and ``train_defaults``): the one place the CLI and the flow take them."""
    from varlide.models import ENHANCERS

    info = ENHANCERS.info(enhancer)
    out = dict(info.get("train_defaults") or {})
    if info.get("default_loss"):
        out["loss"] = info["default_loss"]
    return out


def _augment(clean: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """The paper's degradation on a clean crop (see the module docstring)."""
    from varlide.demo import degrade

    darken = rng.random() < cfg.darken_prob
    blur = rng.random() < cfg.blur_prob
    over: dict[str, float] = {}
    if not (darken and _luma_mean(clean) > 0.3):
        over.update(gamma=1.0, exposure=1.0)
    if not blur:
        over["kernel_length"] = 1
    if not cfg.noise:
        over.update(noise_sigma=0.0, shot_noise=0.0)
    low, _ = degrade(clean, rng, **over)
    return low


def _pair_input(clean: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    """A paired model's input: the restoration degradation (``varlide.demo.blur_pair``)."""
    from varlide.demo import blur_pair

    low, _ = blur_pair(clean, rng, cfg.kernel_max, cfg.trajectory_prob, noise=cfg.noise)
    return low


def _as_batch(arrs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class _Batches:
    """Makes step ``s``'s batch from ``default_rng([seed, s])``, ahead, in a thread."""

    def __init__(self, images: list[_Image], cfg: TrainConfig, prior, start: int) -> None:
        self.images, self.cfg, self.prior = images, cfg, prior
        self.paired = is_paired(cfg.enhancer)
        self.q: queue.Queue = queue.Queue(cfg.prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True,
                                       name="train-batches")
        self.thread.start()

    def make(self, step: int):
        cfg = self.cfg
        key = step % cfg.overfit_batches if cfg.overfit_batches else step
        rng = np.random.default_rng([cfg.seed, key])
        crops, refs = [], []
        while len(crops) < cfg.batch_size:
            img = _decode_u8(self.images[int(rng.integers(len(self.images)))].data)
            if img is None:
                continue
            if min(img.shape[:2]) < cfg.crop:  # small image: upscale so a crop fits
                k = cfg.crop / min(img.shape[:2])
                t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
                size = (max(cfg.crop, round(img.shape[0] * k)),
                        max(cfg.crop, round(img.shape[1] * k)))
                img = F.interpolate(t, size=size, mode="bilinear").clamp(0, 255)[0]
                img = img.permute(1, 2, 0).round().byte().numpy()
            clean = _random_crop(img, cfg.crop, cfg.scale, rng)
            if self.paired:
                crops.append(_pair_input(clean, rng, cfg))
                refs.append(clean)
            else:
                crops.append(_augment(clean, rng, cfg))
        x = _as_batch(crops)
        s = self.prior.score(x)
        if self.paired:
            return x, s.visibility.float(), s.blur.float(), _as_batch(refs)
        return x, s.visibility.float(), s.blur.float()

    def _run(self, start: int) -> None:
        step = start
        while not self.stop.is_set():
            try:
                item = (step, self.make(step))
            except BaseException as exc:  # surfaced in the training loop
                item = (step, exc)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            step += 1

    def get(self, step: int):
        got, item = self.q.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"making the batch of step {got} failed: {item}") from item
        assert got == step, (got, step)
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _validation_set(images: list[_Image], cfg: TrainConfig, prior) -> dict[str, Any] | None:
    """Fixed val crops: a 'natural' item per image (its own exposure, blur + noise), and a
    'paired' one (darkened + blur + noise, reference = the clean crop) for moderately lit
    sources (mean luma 0.3-0.6). Deterministic from the images' hashes."""
    natural, paired, refs, bins = [], [], [], []
    paired_model = is_paired(cfg.enhancer)
    for im in images:
        img = _decode_u8(im.data)
        if img is None:
            continue
        h, w = img.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        t = torch.from_numpy(np.array(img[y0:y0 + side, x0:x0 + side]))
        t = t.permute(2, 0, 1)[None].float() / 255
        t = F.interpolate(t, size=(cfg.val_crop, cfg.val_crop), mode="bilinear",
                          antialias=side > cfg.val_crop, align_corners=False).clamp(0, 1)
        clean = np.ascontiguousarray(t[0].permute(1, 2, 0).numpy())
        rng = np.random.default_rng([cfg.seed, 1_000_003, int(im.sha256[:8], 16)])
        from varlide.demo import degrade

        if paired_model:  # the restoration pairs; their references come with them
            natural.append(_pair_input(clean, rng, cfg))
            refs.append(clean)
            bins.append(_bin(_luma_mean(clean)))
            continue
        nat, _ = degrade(clean, rng, gamma=1.0, exposure=1.0)
        natural.append(nat)
        bins.append(_bin(_luma_mean(nat)))
        m = _luma_mean(clean)
        if 0.3 <= m <= 0.6:
            low, _ = degrade(clean, rng)
            paired.append(low)
            refs.append(clean)
    if not natural:
        return None

    def batch(arrs):
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    out: dict[str, Any] = {"natural": batch(natural), "bins": bins}
    s = prior.score(out["natural"])
    out["nat_v"], out["nat_b"] = s.visibility.float(), s.blur.float()
    if paired_model:
        out["natural_refs"] = batch(refs)
        return out
    if paired:
        out["paired"], out["refs"] = batch(paired), batch(refs)
        s = prior.score(out["paired"])
        out["pair_v"], out["pair_b"] = s.visibility.float(), s.blur.float()
    return out


# --------------------------------------------------------------------------- model / loss


def build_model(cfg: TrainConfig):
    """The trainable enhancer of step 0: its registered ``model`` class builds it from
    ``cfg.model`` and, with ``init_from``, the weights there (``for_training``)."""
    from varlide.models import ENHANCERS

    cls = ENHANCERS.info(cfg.enhancer)["model"]
    init = None
    if cfg.init_from:
        from varlide.resolver import local_weights

        init = local_weights(cfg.init_from)
    return cls.for_training(cfg.model, init)


def trainable_enhancers() -> list[str]:
    from varlide.models import ENHANCERS

    return ENHANCERS.names_where("trainable")


def default_loss(enhancer: str) -> str:
    """The loss an enhancer trains with unless told otherwise (its registry metadata)."""
    from varlide.models import ENHANCERS

    return ENHANCERS.info(enhancer).get("default_loss") or "varlide"


def build_loss(cfg: TrainConfig):
    from varlide.losses import create_loss

    return create_loss(cfg.loss, weights=cfg.loss_weights or None, **cfg.loss_options)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up then cosine from ``lr`` to ``lr * lr_final`` (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


def temperature_at(cfg: TrainConfig, step: int) -> float:
    """Geometric anneal of VICM's soft-mask temperature over the run."""
    t0, t1 = cfg.temperature
    t = min(1.0, step / max(1, cfg.steps - 1))
    return float(t0 * (t1 / t0) ** t)


# --------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (with state.json) as (step, uri), oldest first."""
    from varlide.storage.uri import filesystem, join

    fs, base = filesystem(join(out_dir, "checkpoints"))
    try:
        fs.invalidate_cache(base)
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        name = e.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("step-"):
            continue
        try:
            step = int(name[5:])
        except ValueError:
            continue
        uri = join(out_dir, "checkpoints", name)
        fs2, p = filesystem(join(uri, "state.json"))
        if fs2.exists(p):
            found.append((step, uri))
    return sorted(found)


def _save_checkpoint(out_dir: str, step: int, model, opt, state: dict[str, Any],
                     extra: dict[str, Any]) -> str:
    from safetensors.torch import save

    from varlide.storage.uri import join, write_bytes

    uri = join(out_dir, "checkpoints", _checkpoint_name(step))
    model.save_pretrained(uri, extra=extra)
    tensors, meta = _optimizer_tensors(opt)
    write_bytes(join(uri, "optimizer.safetensors"), save(tensors))
    state = {**state, "optimizer": meta}
    write_bytes(join(uri, "state.json"), json.dumps(state, indent=1).encode())  # last: marker
    return uri


def _prune_checkpoints(out_dir: str, keep: int) -> None:
    from varlide.storage.uri import filesystem

    for _, uri in _list_checkpoints(out_dir)[:-keep]:
        fs, p = filesystem(uri)
        try:
            fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass


def _config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = set(saved) | set(now)
    return sorted(k for k in keys if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k))


# --------------------------------------------------------------------------- validation


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def validate(model, loss_fn, val: dict[str, Any], device: torch.device, amp: bool,
             chunk: int = 16) -> dict[str, float]:
    """Validation measures with the inference path (hard truncation): ``val/loss`` and its
    terms on the natural crops, ``val/brightness_<bin>`` and ``val/n_iter_<bin>`` by the
    input's exposure class, ``val/psnr_paired`` against the clean crops."""
    from varlide.priors.analytic import luma

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        def run(x, v, b, refs=None):
            ys, ns, totals, terms = [], [], [], {}
            for i in range(0, x.shape[0], chunk):
                xi = x[i:i + chunk].to(device)
                vi, bi = v[i:i + chunk].to(device), b[i:i + chunk].to(device)
                with autocast_for(device, "auto" if amp else "fp32"):
                    o = model(xi, vi, bi, mask="hard")
                if refs is not None:
                    o["reference"] = refs[i:i + chunk].to(device)
                total, t = loss_fn(o, xi, vi, bi)
                totals.append(float(total) * xi.shape[0])
                for k, val_ in t.items():
                    terms[k] = terms.get(k, 0.0) + val_ * xi.shape[0]
                ys.append(o["image"].float().clamp(0, 1).cpu())
                ns.append(o["n_iter"].float().cpu() if "n_iter" in o
                          else torch.zeros(xi.shape[0]))
            n = x.shape[0]
            return torch.cat(ys), torch.cat(ns), sum(totals) / n, {k: s / n for k, s in
                                                                    terms.items()}

        nat_refs = val.get("natural_refs")  # a paired model: natural = its degraded pairs
        y, n_iter, total, terms = run(val["natural"], val["nat_v"], val["nat_b"], nat_refs)
        out["val/loss"] = total
        if nat_refs is not None:
            out["val/psnr_paired"] = float(_psnr(y, nat_refs).mean())
            out["val/psnr_paired_input"] = float(_psnr(val["natural"], nat_refs).mean())
        out.update({f"val/{k}": v for k, v in terms.items()})
        bright = luma(y).flatten(1).mean(1)
        for name, _, _ in BRIGHTNESS_BINS:
            idx = [i for i, bn in enumerate(val["bins"]) if bn == name]
            if idx:
                out[f"val/brightness_{name}"] = float(bright[idx].mean())
                if nat_refs is None:  # curve models: how many iterations each class took
                    out[f"val/n_iter_{name}"] = float(n_iter[idx].mean())
        if "paired" in val:
            yp, _, _, _ = run(val["paired"], val["pair_v"], val["pair_b"])
            out["val/psnr_paired"] = float(_psnr(yp, val["refs"]).mean())
            out["val/psnr_paired_input"] = float(_psnr(val["paired"], val["refs"]).mean())
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- train


def train(
    corpus_uri: str,
    out_dir: str,
    config: TrainConfig | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    on_metrics: MetricsCallback | None = None,
) -> TrainResult:
    """Train (or resume) an enhancer on the images under ``corpus_uri``; see the module doc.

    The steps: the data and its held-out split, the model, loss and optimiser, a resume
    from the newest checkpoint, the loop (step, log window, validation, checkpoint), then
    the final weights."""
    from varlide.tracking import redact

    cfg = config or TrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    data = _prepare_data(corpus_uri, cfg)
    model, loss_fn, opt = _build_training(cfg, device, data.prior)
    progress = _resume(out_dir, cfg, model, opt, device)
    extra = {"training": {"data": redact(corpus_uri), "config": cfg.as_dict(),
                          "loss": {"name": cfg.loss, **loss_fn.describe()},
                          "split": {k: v for k, v in data.split.items()
                                    if k != "val_rel_paths"}}}
    loop = _Loop(cfg, model, loss_fn, opt, device, data, progress, out_dir, extra,
                 on_checkpoint, on_metrics)
    loop.run()
    seconds = time.perf_counter() - started
    last_val = {k: v[-1] for k, v in progress.val_curves.items() if k != "step" and v}
    extra["training"].update(steps=cfg.steps, resumed_from=progress.resumed_from,
                             val=last_val, seconds_this_call=round(seconds, 1))
    final_uri, version = _save_final(model, cfg, out_dir, extra, progress)
    if on_checkpoint:
        on_checkpoint(cfg.steps, final_uri)
    steps_per_s = loop.steps_per_s
    if math.isnan(steps_per_s) and progress.curves.get("steps_per_s"):
        steps_per_s = progress.curves["steps_per_s"][-1]
    return TrainResult(
        weights_uri=final_uri, version=version, steps=cfg.steps,
        resumed_from=progress.resumed_from, seconds=seconds, steps_per_s=steps_per_s,
        curves=progress.curves, val_curves=progress.val_curves, split=data.split,
        checkpoints=loop.checkpoints,
    )


@dataclass
class _Data:
    train_set: list[_Image]
    val: dict[str, Any] | None
    prior: Any
    split: dict[str, Any]


def _paired_count(val: dict[str, Any] | None) -> int:
    """Held-out crops with a clean reference: the darkened pairs, or a paired model's all."""
    if not val:
        return 0
    refs = val.get("refs") if "refs" in val else val.get("natural_refs")
    return 0 if refs is None else int(refs.shape[0])


def _prepare_data(corpus_uri: str, cfg: TrainConfig) -> _Data:
    """The corpus read once, the held-out split (``varlide.holdout``), the validation set."""
    from varlide.priors.base import create_prior

    images = _read_corpus(corpus_uri, cfg.max_images)
    train_set, val_set = holdout.split(images, lambda im: im.sha256, cfg.val_fraction,
                                       cfg.val_max)
    if not train_set:
        raise ValueError(f"no training images left under {corpus_uri} after the validation split")
    prior = create_prior(cfg.prior, device="cpu")
    val = _validation_set(val_set, cfg, prior) if val_set else None
    split = {
        "train": len(train_set), "val": len(val_set),
        "val_by_brightness": {n: (val["bins"].count(n) if val else 0)
                              for n, _, _ in BRIGHTNESS_BINS},
        "val_paired": _paired_count(val),
        "val_rel_paths": [im.rel_path for im in val_set],
        "rule": holdout.describe(cfg.val_fraction, cfg.val_max),
    }
    if val and len(images) >= 100 and not split["val_by_brightness"]["mid"]:
        log.warning("training: the validation split holds no moderately lit image")
    return _Data(train_set, val, prior, split)


def _build_training(cfg: TrainConfig, device: torch.device, prior: Any):
    """The model (seeded: the same seed gives the same initial weights), loss, optimiser."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device)
    if device.type == "cuda":  # faster convolutions under bf16 autocast
        model = model.to(memory_format=torch.channels_last)
    model.trained_prior = prior.backend
    model.trained_prior_model = prior.model
    loss_fn = build_loss(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]  # a frozen part has none
    opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, loss_fn, opt


@dataclass
class _Progress:
    curves: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "loss": []})
    val_curves: dict[str, list[float]] = field(default_factory=lambda: {"step": []})
    start: int = 0
    resumed_from: int | None = None


def _resume(out_dir: str, cfg: TrainConfig, model, opt, device: torch.device) -> _Progress:
    """Continue from the newest checkpoint in ``out_dir`` (same config but for
    ``RESUMABLE_FIELDS``); else the model stays as built (``init_from``'s weights or new)."""
    from safetensors.torch import load

    from varlide.storage.uri import filesystem, join

    found = _list_checkpoints(out_dir)
    if not found:  # init_from's weights, if any, came with build_model
        return _Progress()
    _, uri = found[-1]
    fs, p = filesystem(join(uri, "state.json"))
    state = json.loads(fs.cat_file(p))
    diff = _config_diff(state["config"], cfg.as_dict())
    if diff:
        raise ValueError(
            f"{out_dir} holds a run with another training config (fields {diff}); "
            "resume with the same config (only "
            f"{sorted(RESUMABLE_FIELDS)} may change) or use a new output folder"
        )
    meta, weights, digest = type(model).read_pretrained(uri)
    model._adopt(meta, {k: v.to(device) for k, v in weights.items()}, digest)
    fs, p = filesystem(join(uri, "optimizer.safetensors"))
    tensors = {k: v.to(device) for k, v in load(fs.cat_file(p)).items()}
    _load_optimizer(opt, tensors, state["optimizer"])
    log.info("training: resumed from %s (step %d)", uri, int(state["step"]))
    return _Progress(state["curves"], state["val_curves"], int(state["step"]),
                     int(state["step"]))


class _Loop:
    """The optimisation loop: a step, the log window, validation and checkpoints."""

    def __init__(self, cfg: TrainConfig, model, loss_fn, opt, device: torch.device,
                 data: _Data, progress: _Progress, out_dir: str, extra: dict[str, Any],
                 on_checkpoint: CheckpointCallback | None,
                 on_metrics: MetricsCallback | None) -> None:
        self.cfg, self.model, self.loss_fn, self.opt, self.device = cfg, model, loss_fn, opt, device
        self.data, self.progress, self.out_dir, self.extra = data, progress, out_dir, extra
        self.on_checkpoint, self.on_metrics = on_checkpoint, on_metrics
        self.channels_last = device.type == "cuda"
        self.checkpoints: list[str] = []
        self.steps_per_s = float("nan")
        self.sums: dict[str, float] = {}
        self.window_t, self.window_n = time.perf_counter(), 0

    def run(self) -> None:
        cfg, start = self.cfg, self.progress.start
        batches = _Batches(self.data.train_set, cfg, self.data.prior, start) \
            if start < cfg.steps else None
        self.model.train()
        try:
            for step in range(start, cfg.steps):
                out, lr, temp = self.step(batches.get(step), step)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    self.log_window(done, out, lr, temp)
                if self.data.val is not None and (done % cfg.val_every == 0
                                                  or done == cfg.steps):
                    self.validate(done)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    self.checkpoint(done)
        finally:
            if batches is not None:
                batches.close()

    def step(self, batch, step: int):
        """One optimiser step; the window's sums grow by its loss terms."""
        cfg, device = self.cfg, self.device
        x, v, b, *ref = batch  # a paired model's batch ends with its clean references
        x, v, b = x.to(device, non_blocking=True), v.to(device), b.to(device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        temp = temperature_at(cfg, step)
        with autocast_for(device, "auto" if cfg.amp else "fp32"):
            out = self.model(x, v, b, mask=cfg.mask, temperature=temp)
        if ref:
            out["reference"] = ref[0].to(device, non_blocking=True)
        loss, terms = self.loss_fn(out, x, v, b)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training: loss is {float(loss)} at step {step + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(loss.detach())
        for k, t in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + t
        self.window_n += 1
        return out, lr, temp

    def log_window(self, done: int, out: dict, lr: float, temp: float) -> None:
        """The mean of the window's terms, speed and schedule into the curves."""
        curves = self.progress.curves
        now = time.perf_counter()
        self.steps_per_s = self.window_n / max(now - self.window_t, 1e-9)
        metrics = {k: s / self.window_n for k, s in self.sums.items()}
        if out.get("tau") is not None:
            metrics["tau_mean"] = float(out["tau"].detach().float().mean())
        if out.get("strength") is not None:
            metrics["strength_mean"] = float(out["strength"].detach().float().mean())
        curves["step"].append(done)
        for k, val_ in metrics.items():
            curves.setdefault(k, []).append(val_)
        metrics.update(lr=lr, temperature=temp, steps_per_s=self.steps_per_s)
        for k in ("lr", "temperature", "steps_per_s"):
            curves.setdefault(k, []).append(metrics[k])
        if self.on_metrics:
            self.on_metrics(done, metrics)
        self.sums, self.window_n, self.window_t = {}, 0, now

    def validate(self, done: int) -> None:
        vm = validate(self.model, self.loss_fn, self.data.val, self.device, self.cfg.amp)
        val_curves = self.progress.val_curves
        val_curves["step"].append(done)
        for k, val_ in vm.items():
            val_curves.setdefault(k, []).append(val_)
        if self.on_metrics:
            self.on_metrics(done, vm)
        self.window_t = time.perf_counter()  # validation time is not training speed

    def checkpoint(self, done: int) -> None:
        state = {"step": done, "config": self.cfg.as_dict(), "curves": self.progress.curves,
                 "val_curves": self.progress.val_curves}
        uri = _save_checkpoint(self.out_dir, done, self.model, self.opt, state, self.extra)
        self.checkpoints.append(uri)
        _prune_checkpoints(self.out_dir, self.cfg.keep_checkpoints)
        if self.on_checkpoint:
            self.on_checkpoint(done, uri)
        self.window_t = time.perf_counter()


def _save_final(model, cfg: TrainConfig, out_dir: str, extra: dict[str, Any],
                progress: _Progress) -> tuple[str, str]:
    """``OUT/final/`` with the final backbone and inference settings, and ``curves.json``."""
    from varlide.storage.uri import join, write_bytes

    final_uri = join(out_dir, "final")
    model.eval()
    if cfg.final_backbone and hasattr(model, "set_backbone"):  # varlide-lite
        model.set_backbone(cfg.final_backbone)
    if cfg.final_inference_downscale and hasattr(model.config, "inference_downscale"):
        model.config = dataclasses.replace(model.config,
                                           inference_downscale=cfg.final_inference_downscale)
    version = model.save_pretrained(final_uri, extra=extra)
    write_bytes(join(out_dir, "curves.json"), json.dumps(
        {"train": progress.curves, "val": progress.val_curves}, indent=1).encode())
    return final_uri, version
