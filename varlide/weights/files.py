"""Weight files and where they live: locations, the file and requirement records, the
presence check and its error. Knows no backend: the backends list their own files
(``varlide.iqa.files``, ``varlide.priors.clip_files``, ``varlide.models.files``).

Locations, each where its library looks for it, are written ``scheme:rest``:
``torch-hub:pyiqa/<f>`` (pyiqa's cache, ``$TORCH_HOME/hub/pyiqa``), ``torch-hub:checkpoints/<f>``
(torchvision), ``torch-hub:clip/<f>`` (pyiqa's CLIP loader), ``hf:<org>/<repo>/<file>`` (the
Hugging Face hub cache, ``$HF_HUB_CACHE``: timm, open_clip), ``cache:<rel>`` (varlide's own
cache, ``$VARLIDE_WEIGHTS_CACHE``, default ``~/.cache/varlide``), ``package:<rel>`` (the
shipped weights inside the installed package, ``varlide/models/shipped/``), ``file:<abs
path>`` (a file the user named; never mirrored).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "weights.lock.json"

HF_BASE = "https://huggingface.co"

HF_FALLBACK_REVISION = "varlide-mirror"  # snapshot name when a file arrives without a revision

MIRRORABLE = ("torch-hub", "hf", "cache", "package")


class WeightsError(RuntimeError):
    """A weights operation failed (mirror without a lock file, checksum mismatch ...)."""

class WeightsMissingError(FileNotFoundError):
    """Weight files a run needs are not on this machine; the message says how to get them."""



# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """varlide's own weights cache: ``$VARLIDE_WEIGHTS_CACHE``, default ``~/.cache/varlide``."""
    return Path(os.environ.get("VARLIDE_WEIGHTS_CACHE") or "~/.cache/varlide").expanduser()

def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` (pyiqa's and torchvision's caches live under it)."""
    torch = sys.modules.get("torch")
    if torch is not None:  # honours torch.hub.set_dir as well as $TORCH_HOME
        return Path(torch.hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(home).expanduser() / "hub"

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"



def package_dir() -> Path:
    """``varlide/models/shipped/``: the enhancers' shipped default weights."""
    return Path(__file__).resolve().parents[1] / "models" / "shipped"


def lock_path() -> Path:
    return cache_dir() / LOCK_NAME

def split_hf(rest: str) -> tuple[str, str]:
    parts = rest.split("/")
    if len(parts) < 3:
        raise ValueError(f"hf location needs org/repo/file, got {rest!r}")
    return "/".join(parts[:2]), "/".join(parts[2:])

def hf_repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))

def _hf_path(repo: str, filename: str, revision: str | None, for_write: bool) -> Path:
    base = hf_repo_dir(repo)
    ref = base / "refs" / "main"
    main = ref.read_text().strip() if ref.is_file() else None
    if not for_write:
        for rev in [r for r in (main, revision) if r]:
            if (base / "snapshots" / rev / filename).is_file():
                return base / "snapshots" / rev / filename
        snaps = sorted((base / "snapshots").glob(f"*/{filename}")) if base.is_dir() else []
        if snaps:
            return snaps[0]
    return base / "snapshots" / (main or revision or HF_FALLBACK_REVISION) / filename

def location_path(location: str, revision: str | None = None, for_write: bool = False) -> Path:
    """The local path of a location (see the module docstring); for ``hf:`` the snapshot
    file the hub would return offline (``for_write``: where a new copy goes)."""
    scheme, sep, rest = location.partition(":")
    if not sep or not rest:
        raise ValueError(f"not a weights location: {location!r}")
    if scheme == "torch-hub":
        return torch_hub_dir() / rest
    if scheme == "cache":
        return cache_dir() / rest
    if scheme == "package":
        return package_dir() / rest
    if scheme == "file":
        return Path(rest).expanduser()
    if scheme == "hf":
        repo, filename = split_hf(rest)
        return _hf_path(repo, filename, revision, for_write)
    raise ValueError(f"unknown weights location scheme {scheme!r} in {location!r}")

def location_key(location: str) -> str | None:
    """The file's key (its path in a mirror), None for a user's own ``file:``."""
    scheme, _, rest = location.partition(":")
    return f"{scheme}/{rest}" if scheme in MIRRORABLE else None

def hf_mark_main(location: str, path: Path) -> None:
    """A file written into an hf snapshot: make ``refs/main`` point at that snapshot."""
    if not location.startswith("hf:"):
        return
    repo, filename = split_hf(location[3:])
    ref = hf_repo_dir(repo) / "refs" / "main"
    if not ref.is_file():
        rev = path.parts[len(path.parts) - len(Path(filename).parts) - 1]
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(rev)



# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WeightFile:
    """One external file: where the library expects it and where ``pull`` gets it."""

    location: str
    url: str | None = None  # http(s) or any fsspec URI; None: made here or given by the user
    kind: str = ""  # clip / pyiqa / torchvision / timm / enhancer / calibration / file
    sha256: str | None = None  # published upstream hash (else the lock file's)
    note: str = ""  # how to obtain it when there is no url

    @property
    def key(self) -> str | None:
        return location_key(self.location)

    def path(self, revision: str | None = None) -> Path:
        return location_path(self.location, revision)

    def present(self) -> bool:
        return self.path().is_file()

@dataclass(frozen=True)
class Requirement:
    file: WeightFile
    used_by: str  # "prior clip ViT-B-32:openai", "metric niqe", "enhancer varlide-lite" ...
    optional: bool = False  # listed, never an error when absent (e.g. a calibration)

def hf_file(repo: str, filename: str, kind: str = "hf") -> WeightFile:
    return WeightFile(f"hf:{repo}/{filename}", f"{HF_BASE}/{repo}/resolve/main/{filename}", kind)



def folder_digest(paths: list[Path]) -> str:
    """8 hex digits naming a folder's content cheaply: its small files whole, the weight
    files by name, size and their first and last MiB (a fine-tune changes every byte)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return h.hexdigest()[:8]


def dedupe(reqs: Iterable[Requirement]) -> list[Requirement]:
    """One requirement per location, its users joined."""
    seen: dict[str, Requirement] = {}
    for r in reqs:
        if r.file.location in seen:
            old = seen[r.file.location]
            if r.used_by not in old.used_by.split(", "):
                seen[r.file.location] = Requirement(old.file, f"{old.used_by}, {r.used_by}",
                                                    old.optional and r.optional)
        else:
            seen[r.file.location] = r
    return list(seen.values())


def fetch_hint(reqs: Iterable[Requirement] = ()) -> str:
    mirror = os.environ.get("VARLIDE_WEIGHTS_MIRROR")
    lines = ["fetch them on a machine with network: `varlide weights pull` (with this run's "
             "--config/--prior/--prior-model/--metrics), then `varlide weights mirror URI`; "
             "a worker fills its cache with `varlide weights sync URI` or weights_mirror: URI"]
    if mirror:
        lines.append(f"(weights_mirror is {mirror}: the mirror lacks them too)")
    made = sorted({r.file.note for r in reqs if r.file.url is None and r.file.note})
    lines += [f"files without a download source: {n}" for n in made]
    return "\n".join(lines)

def missing(reqs: Iterable[Requirement]) -> list[Requirement]:
    return [r for r in reqs if not r.optional and not r.file.present()]

def check(reqs: Iterable[Requirement], online: bool = False) -> None:
    """Raise ``WeightsMissingError`` listing every missing required file (``online``: only
    those no library could download itself)."""
    reqs = list(reqs)
    gone = [r for r in missing(reqs) if not (online and r.file.url)]
    if not gone:
        return
    lines = [f"{len(gone)} weight file(s) needed by this run are missing:"]
    for r in gone:
        src = f" (from {r.file.url})" if r.file.url else ""
        lines.append(f"  - {r.used_by}: {r.file.path()}{src}")
    raise WeightsMissingError("\n".join(lines) + "\n" + fetch_hint(gone))

def ensure_files(files: Iterable[WeightFile], used_by: str, online: bool = False) -> None:
    check([Requirement(f, used_by) for f in files], online=online)
