"""The authors' checkpoint files, read and converted: the one place that opens them.

VARSR ships training checkpoints (``torch.save`` of ``{'trainer': {'var_wo_ddp': ...,
...optimizer state...}}``, 13.7 GB for the transformer). ``read_authors_state`` takes the
model's state dict out with ``torch.load(weights_only=True, mmap=True)``: no code runs and
the file is not read into memory whole. ``convert`` writes those tensors alone to a
safetensors file (optionally fp16 / bf16), which loads without any pickle and memory-maps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from varlide.models.var.files import RELEASED

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT = "varsr-state-dict-1"


def read_authors_state(path: str | Path, key: str | None = None) -> tuple[str, dict]:
    """``(key, state dict)`` from a checkpoint in the authors' nesting
    (``['trainer'][key]``; ``key=None`` picks the one of ``var_wo_ddp`` / ``vae_local``
    present), from ``{key: state dict}``, or from a plain state dict file. A safetensors
    file is read as the state dict itself."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return key or "", load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialisation cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and key and isinstance(obj.get(key), dict):
        obj = {"trainer": obj}  # {key: state dict}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor)
                                               for v in obj.values()):
        return key or "", obj  # a plain state dict
    trainer = obj.get("trainer") if isinstance(obj, dict) else None
    if not isinstance(trainer, dict):
        raise ValueError(f"{path}: not a VARSR checkpoint (no ['trainer'] mapping; top-level "
                         f"keys: {sorted(obj)[:8] if isinstance(obj, dict) else type(obj)})")
    known = [f.key for f in RELEASED.values()]
    keys = [key] if key else [k for k in known if k in trainer]
    if len(keys) != 1 or keys[0] not in trainer:
        raise ValueError(f"{path}: ['trainer'] holds {sorted(trainer)}; name the model with "
                         f"key= (one of {known})")
    state = trainer[keys[0]]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: ['trainer'][{keys[0]!r}] holds non-tensors: {bad[:5]}")
    return keys[0], state


def convert(src: str | Path, dst: str | Path, key: str | None = None,
            dtype: str | None = None) -> dict[str, Any]:
    """Write the model tensors of ``src`` to the safetensors file ``dst`` (floating tensors
    cast to ``dtype`` when given; integer buffers kept). Returns a summary: key, tensors,
    parameters, bytes written."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    key, state = read_authors_state(src, key)
    target = DTYPES.get(dtype) if dtype else None
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v)
               .contiguous() for k, v in state.items()}
    meta = {"format": FORMAT, "key": key, "source": os.path.basename(str(src)),
            "dtype": dtype or "as stored"}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except RuntimeError:  # tensors sharing storage: safetensors wants them separate
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, dst)
    return {"key": key, "tensors": len(tensors),
            "parameters": int(sum(v.numel() for v in tensors.values())),
            "bytes": dst.stat().st_size, "dst": str(dst)}
