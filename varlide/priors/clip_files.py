"""The CLIP checkpoints of the ``clip`` prior: the ``prior_model`` spec parser and the file
of any open_clip (model, pretrained tag), from open_clip's own table; extra tags through
``register_clip_checkpoint``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from varlide.weights.files import WeightFile, cache_dir, hf_file

HF_DEFAULT_CLIP_FILE = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME



@dataclass(frozen=True)
class ClipSpec:
    """A parsed ``prior_model``: ``ARCH:TAG``, ``ARCH:/path/ckpt``, ``local-dir:DIR``,
    ``hf-hub:ORG/REPO``."""

    kind: str  # 'tag' | 'file' | 'local-dir' | 'hf-hub'
    arch: str | None = None
    tag: str | None = None
    path: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "tag":
            return f"{self.arch}:{self.tag}"
        if self.kind == "file":
            return f"{self.arch}:{Path(self.path).name}"
        return f"{self.kind}:{self.path}"



DEFAULT_CLIP_MODEL = "ViT-B-32:openai"  # docs/METHOD.md, "Priors"

_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")

_CLIP_EXTRA: dict[tuple[str, str], WeightFile] = {}

_REG_LOCK = threading.Lock()



def parse_clip_model(spec: str | None) -> ClipSpec:
    spec = (spec or DEFAULT_CLIP_MODEL).strip()
    if spec.startswith("local-dir:"):
        return ClipSpec("local-dir", path=str(Path(spec[len("local-dir:"):]).expanduser()))
    if spec.startswith("hf-hub:"):
        return ClipSpec("hf-hub", path=spec[len("hf-hub:"):])
    arch, sep, rest = spec.partition(":")
    if not sep or not arch or not rest:
        raise ValueError(
            f"prior_model {spec!r}: expected ARCH:TAG (e.g. {DEFAULT_CLIP_MODEL}), "
            "ARCH:/path/to/checkpoint, local-dir:/folder or hf-hub:org/repo")
    if "/" in rest or "\\" in rest or rest.endswith(_CKPT_SUFFIXES) or os.path.isfile(rest):
        if "://" in rest:
            raise ValueError(f"prior_model {spec!r}: a remote checkpoint is reached through "
                             "`varlide weights mirror/sync`, not read by a worker directly")
        return ClipSpec("file", arch=arch, path=str(Path(rest).expanduser().resolve()))
    return ClipSpec("tag", arch=arch, tag=rest)

def register_clip_checkpoint(arch: str, tag: str, url: str | None,
                             filename: str = "open_clip_model.safetensors",
                             sha256: str | None = None) -> WeightFile:
    """Add a (model, tag) open_clip does not know, e.g. a team's fine-tuned CLIP; its file
    lives at ``cache:clip/<arch>/<tag>/<filename>`` and ``pull`` fetches it from ``url``."""
    wf = WeightFile(f"cache:clip/{arch}/{tag}/{filename}", url, "clip", sha256=sha256)
    with _REG_LOCK:
        _CLIP_EXTRA[(arch, tag)] = wf
    return wf

def clip_checkpoint(arch: str, tag: str) -> WeightFile:
    """The checkpoint file of an open_clip (model, pretrained tag)."""
    with _REG_LOCK:
        if (arch, tag) in _CLIP_EXTRA:
            return _CLIP_EXTRA[(arch, tag)]
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        local = sorted((cache_dir() / "clip" / arch / tag).glob("*")) if arch and tag else []
        if local:  # arrived through a mirror, registered on another machine
            return WeightFile(f"cache:clip/{arch}/{tag}/{local[0].name}", None, "clip")
        known = list_pretrained_tags_by_model(arch)
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for model {arch!r}; "
                         f"known: {', '.join(known) or 'none (unknown model?)'}")
    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/repo/' = open_clip's default file name; 'org/repo/file.bin' = that file
        repo, filename = (hub.rstrip("/"), HF_DEFAULT_CLIP_FILE) if hub.endswith("/") else \
            os.path.split(hub)
        return hf_file(repo, filename, "clip")
    url = cfg.get("url", "")
    if not url:
        raise ValueError(f"open_clip has no download source for {arch}:{tag}")
    sha = url.split("/")[-2] if "openaipublic" in url else None
    return WeightFile(f"cache:clip/{arch}/{tag}/{os.path.basename(url)}", url, "clip", sha256=sha)

def clip_files(spec: ClipSpec) -> list[WeightFile]:
    if spec.kind == "tag":
        return [clip_checkpoint(spec.arch, spec.tag)]
    if spec.kind == "file":
        return [WeightFile(f"file:{spec.path}", None, "file",
                           note="a checkpoint file named in prior_model")]
    if spec.kind == "local-dir":
        folder = Path(spec.path)
        found = [p for p in sorted(folder.glob("*")) if p.suffix in _CKPT_SUFFIXES]
        out = [WeightFile(f"file:{folder / 'open_clip_config.json'}", None, "file",
                          note="open_clip local-dir: folder")]
        ckpt = found[0] if found else folder / "open_clip_model.safetensors"
        out.append(WeightFile(f"file:{ckpt}", None, "file", note="open_clip local-dir: folder"))
        return out
    return [hf_file(spec.path, "open_clip_config.json", "clip"),
            hf_file(spec.path, HF_DEFAULT_CLIP_FILE, "clip")]



def registered_clip_checkpoints() -> dict[tuple[str, str], WeightFile]:
    """The (model, tag) checkpoints added with ``register_clip_checkpoint``."""
    with _REG_LOCK:
        return dict(_CLIP_EXTRA)


SUPPORTED_CLIP_MODELS = ("ViT-B-32:openai", "ViT-B-16:openai", "RN50:openai",
                         "ViT-L-14:openai", "ViT-B-32:laion2b_s34b_b79k")
