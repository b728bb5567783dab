"""Unsupervised training of an enhancer on any image corpus URI (zero-reference)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.training import train_task


@flow(name="varlide-train")
def train_flow(corpus_uri: str, out_dir: str, config: dict[str, Any] | None = None,
               experiment: str = "varlide-train") -> dict[str, Any]:
    """Train (or resume from the newest checkpoint in ``out_dir``) and record it in MLflow."""
    return train_task(corpus_uri, out_dir, config or {}, experiment)
