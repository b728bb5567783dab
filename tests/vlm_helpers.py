"""Tiny random VLMs the prior tests save to folders (no weights can be downloaded here)."""

from __future__ import annotations

from pathlib import Path

from varlide.priors.random_vlm import TINY_QWEN, save_random_qwen35


def save_tiny_qwen35(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen3.5-VL (one gated-delta, one full attention layer; a 1-block
    vision tower, 8 px patches, frames within 64x64 px) with its processor."""
    return save_random_qwen35(folder, TINY_QWEN, seed)
