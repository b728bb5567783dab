"""Tiny random VLMs the prior tests save to folders (no weights can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch

QWEN_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PATCH = 8  # the vision tower's patch; frames are resized to multiples of PATCH * 2


def _byte_level_bpe(corpus: list[str], specials: list[str], size: int = 400):
    """A byte-level BPE as Qwen's tokenizer class rebuilds it (vocab + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_tiny_qwen35(folder: Path, seed: int = 0, max_side: int = 64) -> Path:
    """A random Qwen3.5-VL (2 text layers: one linear, one full attention; a 1-block vision
    tower) with its processor, as ``save_pretrained`` writes a Q-ReAlign checkpoint."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
    )
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    words = ("excellent good fair poor bad quality visibility contrast sharpness aesthetics "
             "Can you rate the of this picture? The image is user assistant")
    tok = _byte_level_bpe([words] * 20, QWEN_SPECIALS)
    vocab = tok.get_vocab()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   additional_special_tokens=QWEN_SPECIALS[1:],
                                   padding_side="left")
    image = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": (2 * PATCH) ** 2,
                                        "longest_edge": max_side * max_side})
    video = Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image, tokenizer=fast, video_processor=video,
                                 chat_template=QWEN_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    cfg = Qwen3_5Config(
        text_config=dict(vocab_size=len(vocab) + 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=2, linear_num_value_heads=2,
                         full_attention_interval=2, rope_parameters=rope),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=32, num_position_embeddings=64),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # the image must move the last position: faint text
            model.model.language_model.embed_tokens.weight.mul_(0.02)  # embeddings, a
            model.lm_head.weight.mul_(8)  # larger head
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
