"""What the VLM priors (``qinstruct``, ``qrealign``) share about their files: a
``prior_model`` names a hub repo whose files the backend lists, or a local model folder; a
row records the repo id, or the folder's name and a digest of its content.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from varlide.weights.files import WeightFile, folder_digest


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``prior_model``: ``kind`` 'hub' (``path`` = repo id) or 'folder'."""

    kind: str
    path: str

    @property
    def label(self) -> str:
        return self.path if self.kind == "hub" else f"folder:{Path(self.path).name}"


def parse_model_spec(spec: str | None, default: str, known: Collection[str],
                     refusal: str) -> ModelSpec:
    """``prior_model`` -> spec: ``local-dir:PATH``, a path (absolute, ``./``, ``~``) or an
    existing folder is a folder; else a repo id (``hf-hub:`` prefix allowed) that must be in
    ``known`` (its files are listed, so they can be pulled and mirrored), else a ValueError
    ending in ``refusal``."""
    spec = (spec or default).strip().removeprefix("hf-hub:")
    if spec.startswith("local-dir:"):
        return ModelSpec("folder", str(Path(spec[len("local-dir:"):]).expanduser().resolve()))
    if spec.startswith(("/", ".", "~")) or Path(spec).expanduser().is_dir():
        return ModelSpec("folder", str(Path(spec).expanduser().resolve()))
    if spec not in known:
        raise ValueError(f"prior_model {spec!r}: {refusal}")
    return ModelSpec("hub", spec)


def model_label(spec: ModelSpec, folder_paths: Callable[[Path], list[Path]]) -> str:
    """The ``prior_model`` a row records: the repo id, or ``folder:<name>@<sha8>`` of the
    folder's content (just ``folder:<name>`` while its files are not all there)."""
    if spec.kind == "hub":
        return spec.label
    paths = folder_paths(Path(spec.path))
    if not all(p.is_file() for p in paths):
        return spec.label
    return f"{spec.label}@{folder_digest(paths)}"


def snapshot_folder(files: list[WeightFile], repo: str) -> Path:
    """The one hub snapshot folder that holds ``repo``'s files (several: re-pull them)."""
    parents = {f.path().parent for f in files if f.location.startswith(f"hf:{repo}/")}
    if len(parents) != 1:
        raise FileNotFoundError(f"the files of {repo} lie in several hub snapshots "
                                f"({', '.join(sorted(map(str, parents)))}); re-pull them")
    return parents.pop()
