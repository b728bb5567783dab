"""Offline by default: the libraries' offline switches, and downloads turned into a clear
``WeightsMissingError`` on a worker that may not fetch."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from varlide.weights.files import WeightsMissingError, fetch_hint

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


_ONLINE = False  # offline unless a config says weights_online (or `weights pull` runs)

def is_online() -> bool:
    """Whether models may download missing files in this process (default: no)."""
    return _ONLINE

def set_offline(offline: bool = True) -> None:
    """The libraries' offline switches (Hugging Face hub, transformers, datasets): set in
    every worker unless weights_online, so nothing hangs on retries (timm-backed metrics
    spend ~46 s retrying without them)."""
    global _ONLINE
    _ONLINE = not offline
    if not offline:
        return
    os.environ.update(OFFLINE_ENV)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read at import time; patch the live value too
        constants.HF_HUB_OFFLINE = True

class _Blocked:
    """Stands in for a download function while downloads are blocked."""

    def __init__(self, used_by: str) -> None:
        self.used_by = used_by

    def __call__(self, url: str, *args: Any, **kwargs: Any) -> Any:
        dst = args[0] if args else kwargs.get("dst", "")
        raise WeightsMissingError(
            f"{self.used_by} tried to download {url} (to {dst or 'its cache'}) on a worker "
            "that is offline (weights_online: false); no file of that name is in the cache.\n"
            + fetch_hint())

@contextlib.contextmanager
def blocked_downloads(used_by: str) -> Iterator[None]:
    """Within the block, torch.hub's and pyiqa's download helpers raise a clear
    ``WeightsMissingError`` instead of trying the network."""
    import torch.hub

    stub = _Blocked(used_by)
    patches: list[tuple[Any, str, Any]] = [(torch.hub, "download_url_to_file", stub)]
    dl = sys.modules.get("pyiqa.utils.download_util")
    if dl is not None:
        patches.append((dl, "download_url_to_file", stub))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
