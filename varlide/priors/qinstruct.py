"""The ``qinstruct`` prior: v and b from Q-Instruct's LLaVA-1.5 7B, as GPP-LLIE extracts them.

GPP-LLIE (``Generative-Perceptual-Prior-Extraction/eval_scripts/llava_v1.5``) asks
``teowu/llava_v1.5_7b_qinstruct_preview_v0.1`` to rate three attributes of a frame (the
``PROMPTS``) and reads, at the last prompt position, the logits of the tokens "good" (1781)
and "poor" (6460)::

    s_k = 1 / (1 + exp((poor_k - good_k) / 3))          k: visibility, contrast, sharpness
    v   = (s_visibility + s_contrast) / 2                b = 1 - s_sharpness

GPP-LLIE's global prior is the mean of the three; ours splits them because v and b are two
separate conditions of an enhancer: visibility and contrast both fall with exposure (a dark
frame is both hard to see and flat), and two prompts average out one prompt's wording, as
the clip prior's ensembles do; sharpness is the only blur question, so b is its complement.
``score_local`` is GPP-LLIE's local prior: the same three scores on a 4x4 grid of patches,
``(B, 3, 4, 4)``; ``attribute_scores`` gives the raw ``(B, 3)``.

Conversation (``llava_v1``): ``SYSTEM + " USER: <image>\\n" + prompt + " ASSISTANT:"``, the
text either side of ``<image>`` tokenised apart with one BOS (LLaVA's tokenizer_image_token),
the image replaced by the tower's patch features (penultimate CLIP layer, CLS dropped, the
mlp2x_gelu projector): we merge the embeddings ourselves, so the vocabulary needs no image
token. No generation: ONE forward per chunk of images, each image x 3 prompts, left-padded
with position ids from the mask, so the last position is every sequence's real last token;
only that position's logits are computed (``logits_to_keep=1``).

Pre-processing on the batch's device, as the CLIP processor: shortest side to the tower's
size (bicubic, antialiased), centre crop, CLIP mean/std (``varlide.priors.clip.preprocess``).
Precision ``auto``: int8 (bitsandbytes, the vision tower and lm_head kept fp16, as LLaVA's
``load_8bit`` which GPP-LLIE uses) on CUDA when bitsandbytes imports, else bf16 on CUDA, fp32
on CPU; ``bf16``/``fp16``/``fp32``/``int8`` force one. One model per process, device and
precision (``load_qinstruct``). transformers is imported only when a model is loaded
(extra ``vlm``; layouts in ``varlide.priors.llava_convert``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varlide.priors.base import PRIORS, ModelCache, Prior, PriorScores
from varlide.priors.clip import Preprocess, preprocess
from varlide.priors.qinstruct_files import (
    QinstructSpec,
    folder_layout,
    model_folders,
    model_label,
    parse_qinstruct_model,
    prior_files,
    qinstruct_files,
)
from varlide.weights import ensure_files

log = logging.getLogger(__name__)

PROMPT_NAMES = ("visibility", "contrast", "sharpness")
PROMPTS = {  # GPP-LLIE's --query, --query1, --query2
    "visibility": "Visibility refers to the clarity and distinctness with which details of an "
                  "image can be seen and recognized. Rate the visibility of the image.",
    "contrast": "Contrast refers to the difference in luminance or color that makes an object "
                "distinguishable from others within an image. Rate the contrast of the image.",
    "sharpness": "Sharpness refers to the clarity of detail and the edge definition in an "
                 "image. Rate the sharpness of the image.",
}
VISIBILITY_FROM = ("visibility", "contrast")  # v: their mean
BLUR_FROM = "sharpness"  # b = 1 - its score
GOOD_TOKEN, POOR_TOKEN = 1781, 6460  # LLaMA's "▁good", "▁poor"
TEMPERATURE = 3.0
GRID = 4
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE_PLACEHOLDER = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "int8": torch.float16}


def conversation(prompt: str) -> str:
    """LLaVA's ``llava_v1`` template, one user turn, the assistant's turn left open."""
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{prompt} ASSISTANT:"


def good_poor_score(good: torch.Tensor, poor: torch.Tensor,
                    temperature: float = TEMPERATURE) -> torch.Tensor:
    """GPP-LLIE's ``1 / (1 + exp((poor - good) / T))``, in [0, 1]."""
    return torch.sigmoid((good.float() - poor.float()) / temperature)


# --------------------------------------------------------------------------- prompts


def image_prompt_ids(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(ids before the image, ids after): each side tokenised alone, the second side's BOS
    dropped (LLaVA's ``tokenizer_image_token``)."""
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep or IMAGE_PLACEHOLDER in after:
        raise ValueError(f"a qinstruct prompt holds exactly one {IMAGE_PLACEHOLDER}")
    a, b = tokenizer(before).input_ids, tokenizer(after).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and a[:1] == [bos] and b[:1] == [bos]:
        b = b[1:]
    return list(a), list(b)


@dataclass
class PromptBatch:
    """The prompts as one left-padded batch, an image's ``n_image`` slots in each."""

    ids: torch.Tensor  # (P, L) long; image slots and pads hold pad_id
    mask: torch.Tensor  # (P, L) long: 1 real (text or image), 0 pad
    image: torch.Tensor  # (P, L) bool: the image slots
    positions: torch.Tensor  # (P, L) long: position ids from the mask

    def to(self, device: torch.device) -> PromptBatch:
        return PromptBatch(*(t.to(device) for t in (self.ids, self.mask, self.image,
                                                    self.positions)))


def build_prompt_batch(tokenizer: Any, prompts: list[str], n_image: int,
                       pad_id: int = 0) -> PromptBatch:
    rows = []
    for prompt in prompts:
        a, b = image_prompt_ids(tokenizer, conversation(prompt))
        rows.append((a, b))
    length = max(len(a) + n_image + len(b) for a, b in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    image = torch.zeros_like(ids, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        start = length - (len(a) + n_image + len(b))
        ids[i, start:start + len(a)] = torch.tensor(a, dtype=torch.long)
        if b:
            ids[i, length - len(b):] = torch.tensor(b, dtype=torch.long)
        image[i, start + len(a):start + len(a) + n_image] = True
        mask[i, start:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PromptBatch(ids, mask, image, positions)


def grid_bounds(size: int, grid: int = GRID) -> list[tuple[int, int]]:
    """GPP-LLIE's patch bounds along one side: the side padded up to a multiple of ``grid``,
    cut in ``grid`` equal steps (the last patch is short by the padding)."""
    step = (-(-size // grid) * grid) / grid
    return [(int(step * i), min(size, int(step * (i + 1)))) for i in range(grid)]


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedLlava:
    model: torch.nn.Module
    tokenizer: Any
    preprocess: Preprocess
    label: str
    precision: str


_MODELS = ModelCache()  # (spec, device, precision) -> LoadedLlava


def _bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken CUDA install raises anything)
        return False
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> int8 (CUDA + bitsandbytes), bf16 (CUDA), fp32 (CPU); checks the rest."""
    if precision not in PRECISIONS:
        raise ValueError(f"qinstruct precision must be one of {', '.join(PRECISIONS)}, "
                         f"not {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        return ("int8" if _bitsandbytes() else "bf16") if cuda else "fp32"
    if precision == "int8" and not (cuda and _bitsandbytes()):
        raise ValueError("qinstruct precision int8 needs a CUDA device and bitsandbytes")
    return precision


def _from_pretrained(source: Path | None, cfg: Any, state: dict | None, precision: str,
                     device: torch.device) -> torch.nn.Module:
    """transformers' loader on a folder, or on (config, converted state dict); every key
    must match (a missing one would be left random)."""
    from transformers import LlavaForConditionalGeneration

    kw: dict[str, Any] = {"dtype": DTYPES[precision]}
    if precision == "int8":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=["vision_tower", "lm_head"])
        kw["device_map"] = {"": device.index or 0}
    model, info = LlavaForConditionalGeneration.from_pretrained(
        str(source) if source else None, config=cfg, state_dict=state,
        output_loading_info=True, local_files_only=True, **kw)
    bad = {k: sorted(v)[:6] for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"qinstruct: the converted weights do not fit the model: {bad}")
    if precision != "int8":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _check_tokens(tokenizer: Any, label: str) -> None:
    try:
        pieces = tokenizer.convert_ids_to_tokens([GOOD_TOKEN, POOR_TOKEN])
    except Exception:  # noqa: BLE001 (ids beyond a small vocabulary)
        pieces = [None, None]
    if [str(p).lstrip("▁ ") for p in pieces] != ["good", "poor"]:
        log.warning("qinstruct %s: tokens %d/%d are %s, not 'good'/'poor': the scores read "
                    "other logits than GPP-LLIE's", label, GOOD_TOKEN, POOR_TOKEN, pieces)


def _create(spec: QinstructSpec, device: torch.device, precision: str) -> LoadedLlava:
    from transformers import AutoTokenizer

    from varlide.priors.llava_convert import convert_original

    ensure_files(qinstruct_files(spec), f"prior qinstruct {spec.label}")
    folder, tower = model_folders(spec)
    label = model_label(spec)
    if spec.kind == "folder" and folder_layout(folder) == "transformers":
        model = _from_pretrained(folder, None, None, precision, device)
    else:
        cfg, state = convert_original(folder, tower)
        model = _from_pretrained(None, cfg, state, precision, device)
        del state
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    _check_tokens(tokenizer, label)
    size = int(model.config.vision_config.image_size)
    pre = Preprocess(size=(size, size), mean=CLIP_MEAN, std=CLIP_STD)
    return LoadedLlava(model, tokenizer, pre, label, precision)


def load_qinstruct(spec: QinstructSpec | str | None, device: str | torch.device = "cpu",
                   precision: str = "auto") -> LoadedLlava:
    """The LLaVA of ``spec`` on ``device``: built once per process, device and precision."""
    if not isinstance(spec, QinstructSpec):
        spec = parse_qinstruct_model(spec)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    return _MODELS.get((spec, str(device), precision),
                       lambda: _create(spec, device, precision),
                       f"qinstruct prior {spec.label} on {device} ({precision})")


# --------------------------------------------------------------------------- the prior


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vision tower, projector) under either module tree (>= 4.52: ``model.model``)."""
    inner = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    return inner.vision_tower, inner.multi_modal_projector


class QInstructPrior(Prior):
    """Q-Instruct LLaVA attribute scores as v and b (see the module docstring)."""

    backend = "qinstruct"

    def __init__(self, loaded: LoadedLlava, device: str | torch.device = "cpu",
                 max_batch: int = 8) -> None:
        self.device = torch.device(device)
        self.net = loaded.model
        self.pre = loaded.preprocess
        self.model = loaded.label
        self.precision = loaded.precision
        self.max_batch = max(1, int(max_batch))
        cfg = self.net.config
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        vision = cfg.vision_config
        self.n_image = (vision.image_size // vision.patch_size) ** 2 + (
            1 if self.strategy == "full" else 0)
        pad = loaded.tokenizer.pad_token_id
        self.batch = build_prompt_batch(loaded.tokenizer, [PROMPTS[n] for n in PROMPT_NAMES],
                                        self.n_image, 0 if pad is None else pad).to(self.device)
        self.tower, self.projector = _parts(self.net)
        self.vision_dtype = next(self.tower.parameters()).dtype

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised -> (N, n_image, D): the chosen layer(s), projected."""
        out = self.tower(pixels.to(self.vision_dtype), output_hidden_states=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return self.projector(torch.cat(feats, dim=-1))

    @torch.no_grad()
    def prompt_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised -> (N, 3) scores: one forward of N x 3 sequences."""
        feats = self.image_features(pixels)
        n, p = pixels.shape[0], self.batch.ids.shape[0]
        if feats.shape[1] != self.n_image:
            raise ValueError(f"the tower gave {feats.shape[1]} image tokens, the prompts hold "
                             f"{self.n_image}")
        embeds = self.net.get_input_embeddings()(self.batch.ids.repeat(n, 1))
        slots = self.batch.image.repeat(n, 1).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, feats.repeat_interleave(p, 0).to(embeds.dtype))
        # both the mask and the positions: transformers 4.x masks pads by the mask only;
        # 5.x also reads position ids (and RoPE makes a constant shift harmless)
        out = self.net(inputs_embeds=embeds, attention_mask=self.batch.mask.repeat(n, 1),
                       position_ids=self.batch.positions.repeat(n, 1), use_cache=False,
                       logits_to_keep=1)
        last = out.logits[:, -1]
        return good_poor_score(last[:, GOOD_TOKEN], last[:, POOR_TOKEN]).view(n, p)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        return images.to(self.device, non_blocking=True)

    @torch.no_grad()
    def attribute_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3): visibility, contrast, sharpness in [0, 1]."""
        images = self._check(images)
        return torch.cat([self.prompt_scores(preprocess(c, self.pre))
                          for c in images.split(self.max_batch)])

    def score(self, images: torch.Tensor) -> PriorScores:
        s = self.attribute_scores(images)
        vis = [PROMPT_NAMES.index(n) for n in VISIBILITY_FROM]
        return PriorScores(visibility=s[:, vis].mean(dim=1).float(),
                           blur=(1.0 - s[:, PROMPT_NAMES.index(BLUR_FROM)]).float())

    @torch.no_grad()
    def score_local(self, images: torch.Tensor, grid: int = GRID) -> torch.Tensor:
        """GPP-LLIE's local prior: (B, 3, grid, grid), each cell the three scores of that
        patch alone (cut as ``grid_bounds``, then pre-processed like a frame)."""
        images = self._check(images)
        b = images.shape[0]
        rows, cols = grid_bounds(images.shape[-2], grid), grid_bounds(images.shape[-1], grid)
        cells = [preprocess(images[..., r0:r1, c0:c1], self.pre)
                 for r0, r1 in rows for c0, c1 in cols]  # each (B, 3, S, S)
        pixels = torch.stack(cells, dim=1).flatten(0, 1)  # (B * grid^2, 3, S, S), image-major
        scores = torch.cat([self.prompt_scores(c) for c in pixels.split(self.max_batch)])
        return scores.view(b, grid, grid, -1).permute(0, 3, 1, 2).float()


@PRIORS.register("qinstruct", files=prior_files, local=True)
def _make_qinstruct(device: str | torch.device = "cpu", model: str | None = None,
                    precision: str = "auto", max_batch: int = 8) -> QInstructPrior:
    """``model``: a ``prior_model`` (default the Q-Instruct LLaVA-1.5 7B; or a folder)."""
    loaded = load_qinstruct(model, device, precision)
    return QInstructPrior(loaded, device=device, max_batch=max_batch)
