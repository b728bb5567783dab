"""The ``qrealign`` prior: v and b from Q-ReAlign (Qwen3.5-VL, 0.8 B by default), a small VLM
for machines without a 7 B budget.

Q-ReAlign (q-future; pyiqa's ``qrealign-mini``) is trained the Q-Align way: asked to rate an
image, it puts probability on the level words excellent / good / fair / poor / bad, and the
score is that distribution's mean on the points 1, 0.75, 0.5, 0.25, 0 (a value in [0, 1]).
It was trained for one attribute, overall quality (and aesthetics); it has no visibility or
blur answer of its own. We ask it the Q-Align question about the attributes VAR-LIDE needs,
in the shape of its trained prompt (``ATTRIBUTES``: "Can you rate the <attribute> of this
picture?" and the answer stem "The <attribute> of the image is")::

    s_k = sum_l softmax(logits[level ids])_l * w_l     k: visibility, contrast, sharpness
    v   = (s_visibility + s_contrast) / 2              b = 1 - s_sharpness

as ``qinstruct`` derives v and b from its three attributes (docs/METHOD.md, "Priors"). An
attribute prompt is an extrapolation from what the model was trained on, so its scale is its
own: ``varlide calibrate --prior qrealign --to analytic`` maps it onto the scale an enhancer
was trained on, and without a calibration a run warns (the scale contract).

Scoring: no generation; one forward per attribute and chunk of images, the model's own chat
template and processor (``AutoProcessor``; Qwen's image processor resizes each frame to a
multiple of 32 px within its pixel budget), left padding so the last position is every
sequence's real last token, only that position's logits computed. bf16 on CUDA, fp32 on CPU.
One model per process, device and precision (``load_qrealign``). transformers >= 5.2 (native
``qwen3_5``; extra ``vlm``) is imported only when a model is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from varlide.priors.base import PRIORS, ModelCache, Prior, PriorScores
from varlide.priors.qrealign_files import (
    QReAlignSpec,
    model_folder,
    model_label,
    parse_qrealign_model,
    prior_files,
    qrealign_files,
)
from varlide.weights import ensure_files

log = logging.getLogger(__name__)

LEVELS = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
ATTRIBUTES = {  # (question, answer stem): Q-ReAlign's quality prompt with the attribute swapped
    name: (f"Can you rate the {name} of this picture?", f"The {name} of the image is")
    for name in ("visibility", "contrast", "sharpness")
}
VISIBILITY_FROM = ("visibility", "contrast")  # v: their mean
BLUR_FROM = "sharpness"  # b = 1 - its score
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class LoadedQReAlign:
    model: Any
    processor: Any
    level_ids: torch.Tensor  # (5,) the first token of " excellent" ... " bad"
    label: str
    dtype: torch.dtype


_MODELS = ModelCache()  # (spec, device, dtype) -> LoadedQReAlign


def level_token_ids(tokenizer: Any, words: tuple[str, ...] = LEVELS) -> list[int]:
    """The first token of each level word as it follows the stem (space-prefixed)."""
    ids = []
    for word in words:
        toks = tokenizer(" " + word, add_special_tokens=False)["input_ids"] or \
            tokenizer(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"qrealign: the tokenizer has no token for level word {word!r}")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"qrealign: level words share first tokens {ids}")
    return ids


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _create(spec: QReAlignSpec, device: torch.device, dtype: torch.dtype) -> LoadedQReAlign:
    ensure_files(qrealign_files(spec), f"prior qrealign {spec.label}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = str(model_folder(spec))
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype,
                                                        local_files_only=True)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.tensor(level_token_ids(processor.tokenizer), device=device)
    return LoadedQReAlign(model, processor, ids, model_label(spec), dtype)


def load_qrealign(spec: QReAlignSpec | str | None, device: str | torch.device = "cpu",
                  precision: str = "auto") -> LoadedQReAlign:
    """The model of ``spec`` on ``device``: loaded once per process, device and precision."""
    if not isinstance(spec, QReAlignSpec):
        spec = parse_qrealign_model(spec)
    device = torch.device(device)
    dtype = _dtype(precision, device)
    return _MODELS.get((spec, str(device), dtype), lambda: _create(spec, device, dtype),
                       f"qrealign prior {spec.label} on {device} ({dtype})")


class QReAlignPrior(Prior):
    """v and b from Q-ReAlign's level-word distributions (see the module docstring)."""

    backend = "qrealign"

    def __init__(self, loaded: LoadedQReAlign, device: str | torch.device = "cpu",
                 max_batch: int = 8,
                 attributes: dict[str, tuple[str, str]] | None = None) -> None:
        self.loaded, self.device = loaded, torch.device(device)
        self.model = loaded.label
        self.max_batch = int(max_batch)
        self.weights = torch.tensor(LEVEL_WEIGHTS, device=self.device)
        proc = loaded.processor
        self.attributes = dict(attributes or ATTRIBUTES)  # another set: attribute_scores only
        self.texts = {}
        for name, (question, stem) in self.attributes.items():
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": question}]}]
            self.texts[name] = proc.apply_chat_template(messages,
                                                        add_generation_prompt=True) + stem

    def _inputs(self, images: torch.Tensor, text: str) -> dict[str, torch.Tensor]:
        """Processor inputs for one prompt and a chunk of (3, H, W) images in [0, 1], given
        as 8-bit frames: the processor then resizes them exactly as it does the reference's
        PIL images (lossless for decoded 8-bit frames)."""
        frames = [img.float().clamp(0, 1).mul(255).round().to(torch.uint8) for img in images]
        inputs = self.loaded.processor(text=[text] * len(frames), images=frames,
                                       return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.no_grad()
    def attribute_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K): the scores of ``self.attributes`` in order."""
        out = []
        for chunk in images.split(self.max_batch):
            cols = []
            for text in self.texts.values():
                inputs = self._inputs(chunk, text)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.dtype)
                logits = self.loaded.model(**inputs, logits_to_keep=1).logits[:, -1]
                probs = logits.float()[:, self.loaded.level_ids].softmax(dim=-1)
                cols.append(probs @ self.weights)
            out.append(torch.stack(cols, dim=1))
        return torch.cat(out).float()

    def score(self, images: torch.Tensor) -> PriorScores:
        s = self.attribute_scores(images)
        names = list(self.attributes)
        v = s[:, [names.index(n) for n in VISIBILITY_FROM]].mean(dim=1)
        b = 1 - s[:, names.index(BLUR_FROM)]
        return PriorScores(visibility=v.clamp(0, 1), blur=b.clamp(0, 1))


@PRIORS.register("qrealign", files=prior_files)
def _make_qrealign(device: str | torch.device = "cpu", model: str | None = None,
                   precision: str = "auto", max_batch: int = 8) -> QReAlignPrior:
    """``model``: a ``prior_model`` string (default ``q-future/Q-ReAlign-Mini-0.8B``)."""
    return QReAlignPrior(load_qrealign(model, device, precision), device=device,
                         max_batch=max_batch)
