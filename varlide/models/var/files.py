"""The released VARSR files, as data: where they are published, what they hold, how big.

Read by the weights registry (``varlide weights list --all`` / ``pull``) and by
``checkpoints.py`` (which key of ``['trainer']`` holds which model). Nothing here reads a
file.
"""

from __future__ import annotations

from dataclasses import dataclass

from varlide.weights.files import WeightFile, hf_file

HUB_REPO = "qyp2000/VARSR"


@dataclass(frozen=True)
class ReleasedFile:
    """One file of the authors' release."""

    name: str  # the file name on the hub
    key: str  # the model's state dict inside the file: ['trainer'][key] (checkpoints.py)
    part: str  # "var" (the transformer + refiner) | "vae" (the tokenizer)
    approx_bytes: int  # published size (a training checkpoint: optimizer state included)


RELEASED: dict[str, ReleasedFile] = {
    "var": ReleasedFile("VARSR.pth", "var_wo_ddp", "var", 13_700_000_000),
    "vae": ReleasedFile("VQVAE.pth", "vae_local", "vae", 1_400_000_000),
}
#: Converted, slim files (``varlide weights convert``): model tensors only, no pickle.
CONVERTED = {"var": "varsr.safetensors", "vae": "vqvae.safetensors"}


def released_weight_files() -> list[WeightFile]:
    """The authors' two files as registry entries (Hugging Face hub locations)."""
    out = []
    for f in RELEASED.values():
        wf = hf_file(HUB_REPO, f.name, kind="var")
        out.append(WeightFile(wf.location, wf.url, "var", note=(
            f"{f.name}: ~{f.approx_bytes / 1e9:.1f} GB; convert it once with `varlide weights "
            f"convert {f.name} {CONVERTED[f.part]}` (model tensors only, no pickle)")))
    return out
