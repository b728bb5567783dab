"""The original LLaVA-1.5 checkpoint layout -> transformers' ``LlavaForConditionalGeneration``.

Q-Instruct's LLaVA (and every liuhaotian/llava-v1.5-* repo) is saved by the LLaVA code base,
not by transformers: ``LlavaLlamaForCausalLM`` keys (``model.embed_tokens``, ``model.layers.N``,
``model.norm``, ``lm_head``, the projector ``model.mm_projector.0``/``.2``), a config.json with
LlamaConfig fields plus ``mm_*`` fields, and no vision tower: LLaVA loads
``openai/clip-vit-large-patch14-336`` (``CLIPVisionModel`` keys ``vision_model.*``) on its own.
We map both onto the key names of the installed transformers, in memory, so scoring needs
no converted copy on disk and no LLaVA code base.

Target layouts (``LAYOUTS``; ``installed_layout`` picks the installed one from a meta model):

- ``transformers-5`` (5.x, tested with 5.25.0): ``model.language_model.*``, ``lm_head.*``,
  ``model.vision_tower.*`` (CLIPVisionModel has no ``vision_model`` level any more),
  ``model.multi_modal_projector.linear_1/linear_2``;
- ``transformers-4.52`` (4.52 - 4.57): as 5.x but ``model.vision_tower.vision_model.*``;
- ``transformers-legacy`` (< 4.52): ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*`` (the key map only: scoring
  needs ``logits_to_keep``, so the backend wants >= 4.52).

Weights are read with safetensors or ``torch.load(weights_only=True, mmap=True)``: never a
full unpickle of a downloaded file.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varlide.priors.qinstruct_files import read_json, weight_paths

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one transformers version's LlavaForConditionalGeneration."""

    name: str
    lm: str  # the LlamaModel body: embed_tokens, layers.N, norm
    head: str  # lm_head
    vision: str  # the CLIP vision transformer: embeddings, pre_layrnorm, encoder, post_layernorm
    proj: str  # the projector: linear_1, linear_2


LAYOUTS = (
    Layout("transformers-5", "model.language_model.", "lm_head.", "model.vision_tower.",
           "model.multi_modal_projector."),
    Layout("transformers-4.52", "model.language_model.", "lm_head.",
           "model.vision_tower.vision_model.", "model.multi_modal_projector."),
    Layout("transformers-legacy", "language_model.model.", "language_model.lm_head.",
           "vision_tower.vision_model.", "multi_modal_projector."),
)

# Original LLaVA key prefixes
LLAVA_BODY = ("embed_tokens.", "layers.", "norm.")
LLAVA_PROJ = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
LLAVA_TOWER = "model.vision_tower.vision_tower.vision_model."  # when the tower was trained
CLIP_BODY = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
CLIP_UNUSED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")  # saved by old transformers


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout a LlavaForConditionalGeneration state dict's keys follow."""
    keys = set(keys)
    for layout in LAYOUTS:
        if layout.head + "weight" in keys and any(
                k.startswith(layout.vision + "embeddings.") for k in keys):
            return layout
    raise ValueError("not a LlavaForConditionalGeneration state dict of a known transformers "
                     f"layout ({', '.join(sorted(keys)[:4])} ...)")


@functools.lru_cache(maxsize=1)
def installed_layout() -> Layout:
    """The installed transformers' layout, read off a tiny model built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(
        {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 1, "mm_hidden_size": 8},
        {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 1, "image_size": 4, "patch_size": 2})
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    return detect_layout(model.state_dict().keys())


# --------------------------------------------------------------------------- keys


def map_llava_key(key: str, layout: Layout) -> str | None:
    """An original LLaVA key -> the layout's key (None: a buffer with no counterpart)."""
    if key.endswith(BUFFERS):
        return None
    if key.startswith("lm_head."):
        return layout.head + key[len("lm_head."):]
    for prefix, name in LLAVA_PROJ.items():
        if key.startswith(prefix):
            return layout.proj + name + key[len(prefix):]
    if key.startswith(LLAVA_TOWER):
        return layout.vision + key[len(LLAVA_TOWER):]
    if key.startswith("model.") and key[len("model."):].startswith(LLAVA_BODY):
        return layout.lm + key[len("model."):]
    raise KeyError(key)


def map_clip_key(key: str, layout: Layout) -> str | None:
    """A CLIP file's key (CLIPModel / CLIPVisionModel, with or without ``vision_model.``)
    -> the layout's vision-tower key (None: the text tower, projections, buffers)."""
    if key.endswith(BUFFERS) or key.startswith(CLIP_UNUSED):
        return None
    body = key[len("vision_model."):] if key.startswith("vision_model.") else key
    if body.startswith(CLIP_BODY):
        return layout.vision + body
    raise KeyError(key)


def _mapped(tensors: Mapping[str, torch.Tensor], fn, layout: Layout, what: str) -> Tensors:
    out, unknown = {}, []
    for key, value in tensors.items():
        try:
            new = fn(key, layout)
        except KeyError:
            unknown.append(key)
            continue
        if new is not None:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) of the {what} have no LLaVA-1.5 counterpart "
                         f"(another architecture?): {', '.join(sorted(unknown)[:8])}")
    return out


def convert_state_dict(llava: Mapping[str, torch.Tensor], tower: Mapping[str, torch.Tensor],
                       layout: Layout | None = None) -> Tensors:
    """Original LLaVA tensors + the CLIP tower's -> one LlavaForConditionalGeneration state
    dict (tower keys inside the LLaVA checkpoint, if any, win: they are the fine-tuned ones)."""
    layout = layout or installed_layout()
    out = _mapped(tower, map_clip_key, layout, "vision tower file")
    out.update(_mapped(llava, map_llava_key, layout, "LLaVA checkpoint"))
    return out


def to_original(state: Mapping[str, torch.Tensor], layout: Layout | None = None
                ) -> tuple[Tensors, Tensors]:
    """The inverse: a LlavaForConditionalGeneration state dict -> (LLaVA checkpoint tensors,
    CLIPVisionModel file tensors ``vision_model.*``), as the original repos hold them."""
    layout = layout or detect_layout(state.keys())
    llava, tower = {}, {}
    inverse_proj = {v: k for k, v in LLAVA_PROJ.items()}
    for key, value in state.items():
        if key.startswith(layout.vision):
            tower["vision_model." + key[len(layout.vision):]] = value
        elif key.startswith(layout.head):
            llava["lm_head." + key[len(layout.head):]] = value
        elif key.startswith(layout.proj):
            rest = key[len(layout.proj):]
            name = rest.split(".")[0] + "."
            llava[inverse_proj[name] + rest[len(name):]] = value
        elif key.startswith(layout.lm):
            llava["model." + key[len(layout.lm):]] = value
        else:
            raise ValueError(f"key {key!r} is outside the {layout.name} layout")
    return llava, tower


# --------------------------------------------------------------------------- files


def read_tensors(paths: Iterable[Path]) -> Tensors:
    """The tensors of weight files (index json files are skipped): safetensors, or a torch
    zip checkpoint memory-mapped with ``weights_only=True``."""
    from safetensors.torch import load_file

    out: Tensors = {}
    for path in paths:
        path = Path(path)
        if path.suffix == ".json":
            continue
        if path.suffix == ".safetensors":
            out.update(load_file(str(path)))
        else:
            out.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return out


# --------------------------------------------------------------------------- configs

TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
               "rms_norm_eps", "hidden_act", "rope_theta", "rope_scaling", "attention_bias",
               "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
               "pretraining_tp")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "projection_dim", "hidden_act", "layer_norm_eps",
                 "num_channels", "attention_dropout", "initializer_range")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def _check_supported(original: Mapping[str, Any]) -> None:
    """Refuse what LlavaForConditionalGeneration cannot express (LLaVA-NeXT, im_start/end)."""
    proj = original.get("mm_projector_type", "mlp2x_gelu")
    problems = []
    if proj != "mlp2x_gelu":
        problems.append(f"mm_projector_type {proj!r} (only mlp2x_gelu)")
    if original.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end (needs added image start/end tokens)")
    if original.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {original['mm_patch_merge_type']!r}")
    if original.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        problems.append(f"mm_vision_select_feature {original['mm_vision_select_feature']!r}")
    if problems:
        raise ValueError("unsupported LLaVA config: " + "; ".join(problems))


def llava_config(original: Mapping[str, Any], tower: Mapping[str, Any],
                 image_token_index: int | None = None) -> Any:
    """A transformers ``LlavaConfig`` from the original LLaVA config.json and the tower's
    config.json (a CLIPConfig with ``vision_config``, or a CLIPVisionConfig).

    ``image_token_index`` only matters to transformers' own forward (the prior merges image
    features itself); default: the last vocabulary id, a real token the prompts never hold.
    ``image_aspect_ratio`` is not carried: GPP-LLIE's scripts centre-crop, never pad.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    _check_supported(original)
    vision = dict(tower.get("vision_config", tower))
    vision_kw = {k: vision[k] for k in VISION_FIELDS if vision.get(k) is not None}
    text_kw = {k: original[k] for k in TEXT_FIELDS if original.get(k) is not None}
    text_kw.setdefault("num_key_value_heads", text_kw.get("num_attention_heads"))
    if original.get("mm_hidden_size", vision_kw["hidden_size"]) != vision_kw["hidden_size"]:
        raise ValueError(f"mm_hidden_size {original['mm_hidden_size']} != the tower's "
                         f"hidden_size {vision_kw['hidden_size']}")
    vocab = int(text_kw["vocab_size"])
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_kw), text_config=LlamaConfig(**text_kw),
        image_token_index=vocab - 1 if image_token_index is None else image_token_index,
        projector_hidden_act="gelu",
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=SELECT_FEATURE[
            original.get("mm_vision_select_feature", "patch")],
        image_seq_length=(vision_kw["image_size"] // vision_kw["patch_size"]) ** 2,
        tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
    )


def convert_original(folder: Path, tower_folder: Path, layout: Layout | None = None
                     ) -> tuple[Any, Tensors]:
    """(LlavaConfig, state dict) of an original-layout LLaVA folder and its tower folder."""
    cfg = llava_config(read_json(Path(folder) / "config.json"),
                       read_json(Path(tower_folder) / "config.json"))
    state = convert_state_dict(read_tensors(weight_paths(folder)),
                               read_tensors(weight_paths(tower_folder)), layout)
    return cfg, state
