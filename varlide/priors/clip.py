"""The ``clip`` prior: visibility v and blur b in the CLIP-IQA manner, with open_clip.

CLIP-IQA (Wang, Chan & Loy, AAAI 2023) scores an attribute with an antonym prompt pair: the
softmax of the image's two (scaled) cosine similarities, read as the probability of the
first prompt. We average that probability over a small ensemble of pairs per attribute::

    f   = normalize(encode_image(x))                     x: the frame, CLIP-preprocessed
    t_j = normalize(encode_text(prompt_j))               computed once, at construction
    p_k = softmax(s * [f.t_k+, f.t_k-])[0]                s = exp(logit_scale), at most 100
    v   = mean_k p_k over the visibility pairs     [bright, dark], [well-lit, underexposed] ...
    b   = mean_k p_k over the blur pairs           [blurry, sharp], ...  (b higher = blurrier)

Both are in [0, 1] by construction. The pairs live in the config (``clip_visibility_prompts``,
``clip_blur_prompts``; defaults in ``varlide/config.py`` and docs/METHOD.md "Priors"). The
ensemble is sorted once, so the order the pairs are written in changes nothing, bit for
bit; a logit bias (SigLIP) cancels in a pair's softmax.

Model (``prior_model``): any open_clip ``ARCH:TAG`` (default ``ViT-B-32:openai``), a
checkpoint file ``ARCH:/path/file.safetensors``, an open_clip ``local-dir:/folder`` or an
``hf-hub:org/repo`` already in the hub cache. Tag files are resolved through
``varlide.weights`` (never downloaded by a worker) and loaded like any file:
``open_clip.create_model(arch, pretrained=<file>)`` with the tag's QuickGELU and
normalisation. One model per process and device (``load_clip`` caches it); the prompt
embeddings once per prior. The row's ``prior_model`` is the model's label, plus
``+prompts-<sha8>`` when the prompts are not the defaults (they change the scale).

Pre-processing on the batch's device, as open_clip's own transform for that model: resize
(bicubic, antialiased) so the short side is the tower's input size then centre-crop
(``resize_mode`` 'shortest'; 'squash' and 'longest' (pad) when the model says so), then the
model's mean/std. The frame is seen at 224 px: CLIP's judgement is global (exposure,
obvious blur), not a pixel-level sharpness measure. On CUDA the image tower runs under
bf16 autocast; similarities and softmax are float32. Batches are split into chunks of
``max_batch`` to bound memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from varlide.priors.base import PRIORS, ModelCache, Prior, PriorScores
from varlide.priors.clip_files import ClipSpec, clip_checkpoint, clip_files, parse_clip_model
from varlide.prompts import DEFAULT_CLIP_BLUR_PROMPTS, DEFAULT_CLIP_VISIBILITY_PROMPTS
from varlide.weights import ensure_files

log = logging.getLogger(__name__)

Pairs = tuple[tuple[str, str], ...]
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"


def canonical_pairs(pairs: Any) -> Pairs:
    """Validated, sorted prompt pairs (the ensemble mean does not depend on their order)."""
    out = []
    for p in pairs:
        if not (isinstance(p, list | tuple) and len(p) == 2 and all(
                isinstance(s, str) and s.strip() for s in p)):
            raise ValueError(f"a prompt pair is two non-empty strings, got {p!r}")
        out.append((p[0], p[1]))
    if not out:
        raise ValueError("at least one prompt pair is needed")
    return tuple(sorted(set(out)))


def prompts_suffix(visibility: Any, blur: Any) -> str:
    """'' for the default prompts, else ``+prompts-<sha8>`` of the canonical ensemble."""
    vis, bl = canonical_pairs(visibility), canonical_pairs(blur)
    if (vis, bl) == (canonical_pairs(DEFAULT_CLIP_VISIBILITY_PROMPTS),
                     canonical_pairs(DEFAULT_CLIP_BLUR_PROMPTS)):
        return ""
    digest = hashlib.sha256(json.dumps([vis, bl]).encode()).hexdigest()[:8]
    return f"+prompts-{digest}"


def model_id(spec: ClipSpec, visibility: Any = DEFAULT_CLIP_VISIBILITY_PROMPTS,
             blur: Any = DEFAULT_CLIP_BLUR_PROMPTS) -> str:
    """The ``prior_model`` a clip prior with this model and these prompts records."""
    return spec.label + prompts_suffix(visibility, blur)


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedClip:
    model: torch.nn.Module
    tokenizer: Any
    preprocess: Preprocess
    label: str


_MODELS = ModelCache()  # (spec, device) -> LoadedClip


def _preprocess_of(model: torch.nn.Module, overrides: dict[str, Any]) -> Preprocess:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    size = cfg.get("size") or getattr(model.visual, "image_size", 224)
    if isinstance(size, int):
        size = (size, size)
    return Preprocess(
        size=(int(size[0]), int(size[1])),
        mean=tuple(float(m) for m in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(s) for s in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def _create(spec: ClipSpec) -> LoadedClip:
    import open_clip

    overrides: dict[str, Any] = {}
    quick_gelu = False
    if spec.kind in ("tag", "file"):
        if spec.kind == "tag":
            wf = clip_checkpoint(spec.arch, spec.tag)
            from open_clip.pretrained import get_pretrained_cfg

            tag_cfg = get_pretrained_cfg(spec.arch, spec.tag) or {}
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            overrides = {k: tag_cfg.get(k) for k in ("mean", "std", "interpolation",
                                                     "resize_mode")}
        else:
            wf = clip_files(spec)[0]
        ensure_files([wf], f"prior clip {spec.label}")
        model = open_clip.create_model(spec.arch, pretrained=str(wf.path()), device="cpu",
                                       force_quick_gelu=quick_gelu, weights_only=True,
                                       require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(spec.arch)
    else:  # local-dir: / hf-hub: (the hub offline: its cache only)
        if spec.kind == "local-dir":
            ensure_files(clip_files(spec), f"prior clip {spec.label}")
        name = f"{spec.kind}:{spec.path}"
        model = open_clip.create_model(name, device="cpu", weights_only=True,
                                       require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    return LoadedClip(model.eval(), tokenizer, _preprocess_of(model, overrides), spec.label)


def load_clip(spec: ClipSpec | str | None, device: str | torch.device = "cpu"
              ) -> LoadedClip:
    """The open_clip model of ``spec`` on ``device``: built once per process and device."""
    if not isinstance(spec, ClipSpec):
        spec = parse_clip_model(spec)
    device = torch.device(device)

    def build() -> LoadedClip:
        loaded = _create(spec)
        loaded.model.to(device)
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        return loaded

    return _MODELS.get((spec, str(device)), build, f"clip prior {spec.label} on {device}")


# --------------------------------------------------------------------------- the prior


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = interpolation if interpolation in ("bicubic", "bilinear") else "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def preprocess(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(B, 3|1, H, W) in [0, 1] -> the tower's normalised (B, 3, h, w) input, on-device."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    th, tw = pre.size
    h, w = x.shape[-2:]
    if pre.resize_mode == "squash":
        x = _resize(x, (th, tw), pre.interpolation)
    elif pre.resize_mode == "longest":  # fit inside, pad
        s = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * s))), min(tw, max(1, round(w * s)))
        x = _resize(x, (nh, nw), pre.interpolation)
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = F.pad(x, (left, tw - nw - left, top, th - nh - top))
    else:  # 'shortest': cover, centre crop (torchvision's CenterCrop rounding)
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        x = _resize(x, (nh, nw), pre.interpolation)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    x = x.clamp(0, 1)
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipPrior(Prior):
    """CLIP-IQA-style v and b (see the module docstring) from any open_clip model."""

    backend = "clip"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, pre: Preprocess,
                 label: str, device: str | torch.device = "cpu",
                 visibility_prompts: Any = DEFAULT_CLIP_VISIBILITY_PROMPTS,
                 blur_prompts: Any = DEFAULT_CLIP_BLUR_PROMPTS,
                 precision: str = "auto", max_batch: int = 256) -> None:
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"clip prior precision must be auto/fp32/bf16/fp16, not {precision}")
        self.device = torch.device(device)
        self.net = model
        self.pre = pre
        self.visibility_prompts = canonical_pairs(visibility_prompts)
        self.blur_prompts = canonical_pairs(blur_prompts)
        self.model = label + prompts_suffix(self.visibility_prompts, self.blur_prompts)
        self.max_batch = max_batch
        self.autocast_dtype = None
        if self.device.type == "cuda" and precision != "fp32":
            self.autocast_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = min(MAX_LOGIT_SCALE, float(scale.detach().exp())) if scale is not None \
            else MAX_LOGIT_SCALE
        self.n_vis = len(self.visibility_prompts)
        prompts = [p for pair in self.visibility_prompts + self.blur_prompts for p in pair]
        with torch.no_grad():
            tokens = tokenizer(prompts).to(self.device)
            text = model.encode_text(tokens).float()
        self.text = F.normalize(text, dim=-1)  # (2 P, D): [pos0, neg0, pos1, neg1, ...]

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.device, non_blocking=True), self.pre)
        if self.autocast_dtype is not None:
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                f = self.net.encode_image(x)
        else:
            f = self.net.encode_image(x)
        return F.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> PriorScores:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        vs, bs = [], []
        for chunk in images.split(self.max_batch):
            f = self.image_features(chunk)
            logits = self.logit_scale * (f @ self.text.T)  # (B, 2 P)
            p = logits.view(f.shape[0], -1, 2).softmax(dim=-1)[..., 0]  # (B, P)
            vs.append(p[:, :self.n_vis].mean(dim=1))
            bs.append(p[:, self.n_vis:].mean(dim=1))
        return PriorScores(visibility=torch.cat(vs).float(), blur=torch.cat(bs).float())


def prior_files(model: str | None) -> tuple[str, list]:
    """(label, files) a ``prior_model`` needs: the registry's ``files`` metadata."""
    spec = parse_clip_model(model)
    return spec.label, clip_files(spec)


@PRIORS.register("clip", files=prior_files)
def _make_clip(device: str | torch.device = "cpu", model: str | None = None,
               visibility_prompts: Any = None, blur_prompts: Any = None,
               precision: str = "auto", max_batch: int = 256) -> ClipPrior:
    """``model``: a ``prior_model`` string (default ``ViT-B-32:openai``)."""
    loaded = load_clip(model, device)
    return ClipPrior(loaded.model, loaded.tokenizer, loaded.preprocess, loaded.label,
                     device=device,
                     visibility_prompts=visibility_prompts or DEFAULT_CLIP_VISIBILITY_PROMPTS,
                     blur_prompts=blur_prompts or DEFAULT_CLIP_BLUR_PROMPTS,
                     precision=precision, max_batch=max_batch)
