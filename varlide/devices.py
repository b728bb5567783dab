"""The one device decision: ``auto`` is the first CUDA device when there is one, else CPU;
``cuda`` without CUDA is an error that says so."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available here")
        return torch.device("cuda:0")
    return torch.device(name)
