"""Random-initialised VLMs with working tokenizers and processors, at any size: what tests
(tiny) and benchmarks (the released sizes: random weights cost what real ones do) run when
no weights can be downloaded. Nothing here is used by a run.

``random_qwen35`` builds a Qwen3.5-VL (the ``qrealign`` architecture) with a Qwen3-VL
processor; ``random_llava`` a LLaVA-1.5 (the ``qinstruct`` architecture) with a tokenizer.
The tokenizers are small byte-level BPEs trained on the prompts, so token counts are close
to the real ones (a few per word), not equal. transformers is imported inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

QWEN_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT_WORDS = ("excellent good fair poor bad quality visibility contrast sharpness aesthetics "
                "Can you rate the of this picture? The image is user assistant refers to "
                "clarity and distinctness with which details an can be seen recognized. "
                "Rate difference in luminance or color that makes object distinguishable "
                "from others within edge definition A chat between curious human artificial "
                "intelligence assistant gives helpful, detailed, polite answers human's "
                "questions. USER: ASSISTANT:")

TINY_QWEN = {
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                 linear_num_value_heads=2, full_attention_interval=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                  "partial_rotary_factor": 0.5}),
    "vision": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                   num_position_embeddings=64),
    "max_pixels": 64 * 64,
}
# Qwen3.5-0.8B's sizes as published (24 layers, 18 gated-delta + 6 full attention, GQA 8/2
# of head_dim 256, a 12-block ViT of width 768, 16 px patches); the MLP width is an
# assumption (Qwen3-0.6B's 3072). Pixel budget: Qwen3-VL's default (16.7 M: frames keep
# their size, rounded to 32 px).
QWEN35_08B = {
    "text": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=24,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                 linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                 linear_num_value_heads=16, full_attention_interval=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                  "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                  "partial_rotary_factor": 0.25}),
    "vision": dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                   out_hidden_size=1024, num_position_embeddings=2304),
    "max_pixels": 16_777_216,
}


def byte_level_bpe(corpus: list[str], specials: list[str], size: int = 600):
    """A byte-level BPE (vocab + merges), the kind Qwen's and LLaMA's fast tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def qwen_processor(patch: int, max_pixels: int) -> Any:
    """A Qwen3-VL processor: the BPE, Qwen2-VL's image processor, the chat template."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tok = byte_level_bpe([PROMPT_WORDS] * 20, QWEN_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   additional_special_tokens=QWEN_SPECIALS[1:],
                                   padding_side="left")
    image = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": (2 * patch) ** 2,
                                        "longest_edge": max_pixels})
    video = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image, tokenizer=fast, video_processor=video,
                            chat_template=QWEN_TEMPLATE)


def random_qwen35(sizes: dict[str, Any] = TINY_QWEN, seed: int = 0,
                  sensitive: bool = True) -> tuple[Any, Any]:
    """(Qwen3_5ForConditionalGeneration, processor), random. ``sensitive``: faint text
    embeddings and a larger head, so a tiny model's last position depends on the image."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    processor = qwen_processor(sizes["vision"]["patch_size"], sizes["max_pixels"])
    vocab = processor.tokenizer.get_vocab()
    cfg = Qwen3_5Config(
        text_config={**sizes["text"], "vocab_size": len(vocab) + 8},
        vision_config=sizes["vision"], image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(cfg).eval()
    if sensitive:
        with torch.no_grad():
            model.model.language_model.embed_tokens.weight.mul_(0.02)
            model.lm_head.weight.mul_(8)
    return model, processor


def save_random_qwen35(folder: str | Path, sizes: dict[str, Any] = TINY_QWEN,
                       seed: int = 0) -> Path:
    """A Q-ReAlign-shaped checkpoint folder (``save_pretrained`` of model and processor)."""
    model, processor = random_qwen35(sizes, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


TINY_LLAVA = {
    "text": dict(vocab_size=6500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=28, patch_size=14),
}
# LLaVA-1.5 7B: LLaMA-2 7B and CLIP ViT-L/14 at 336 px (576 image tokens)
LLAVA_7B = {
    "text": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14),
}


def llama_like_tokenizer() -> Any:
    """A byte-level BPE with LLaMA's specials and a BOS on every encoding."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe([PROMPT_WORDS] * 20, ["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")


def random_llava(sizes: dict[str, Any] = TINY_LLAVA, seed: int = 0) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration as LLaVA-1.5 builds it: the penultimate CLIP layer
    without CLS, an mlp2x_gelu projector; a tokenizer), random."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    text = sizes["text"]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**sizes["vision"]),
                      text_config=LlamaConfig(**text), image_token_index=text["vocab_size"] - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llava(cfg).eval()
    return model, llama_like_tokenizer()
