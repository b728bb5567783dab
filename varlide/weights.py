"""Every external file varlide can need: where it comes from, where it lives, its checksum.

GPU workers in a locked-down cluster cannot download, so weights are a managed input:

- **one registry** (this module): the CLIP checkpoints of the ``clip`` prior (any open_clip
  model + pretrained tag, resolved from open_clip's own table; extra tags through
  ``register_clip_checkpoint``), each learned pyiqa metric's files (``PYIQA_FILES``, pyiqa
  0.1.16), the project's own enhancer weights (``varlide/weights/<name>/``) and prior
  calibrations (``varlide calibrate``). ``requirements(cfg)`` says what a config needs.
- **locations**, each where its library looks for it, written ``scheme:rest``:
  ``torch-hub:pyiqa/<f>`` (pyiqa's cache, ``$TORCH_HOME/hub/pyiqa``), ``torch-hub:checkpoints/<f>``
  (torchvision), ``torch-hub:clip/<f>`` (pyiqa's CLIP loader), ``hf:<org>/<repo>/<file>``
  (the Hugging Face hub cache, ``$HF_HUB_CACHE``: timm, open_clip), ``cache:<rel>`` (varlide's
  own cache, ``$VARLIDE_WEIGHTS_CACHE``, default ``~/.cache/varlide``), ``package:<rel>``
  (inside the installed package), ``file:<abs path>`` (a file the user named; never mirrored).
- **a lock file** ``<varlide cache>/weights.lock.json``: for each file its *key* (the location
  with the first ``:`` made a ``/``, also its path in a mirror), location, size, sha256, source
  (and the hub revision). ``pull`` writes it, ``mirror`` copies it with the files, ``sync``
  checks every file it fetches against it, ``verify`` re-hashes the local files.
- **offline by default**: ``prepare_worker`` sets the libraries' offline switches
  (``HF_HUB_OFFLINE`` ...) and syncs from ``weights_mirror`` once per process; a missing file
  is a ``WeightsMissingError`` naming the file, where it is expected and the command that
  fetches it, raised before a run starts (CLI, ``--dry-run``) and before a worker builds
  a model; ``blocked_downloads`` turns a library's silent download attempt into that error.

CLI: ``varlide weights list|pull|mirror URI|sync URI|verify``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from varlide.config import Config

log = logging.getLogger(__name__)

LOCK_NAME = "weights.lock.json"
LOCK_FORMAT = "varlide-weights-lock-1"
PYIQA_BASE = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
TORCHVISION_BASE = "https://download.pytorch.org/models"
HF_BASE = "https://huggingface.co"
HF_DEFAULT_CLIP_FILE = "open_clip_pytorch_model.bin"  # open_clip's HF_WEIGHTS_NAME
HF_FALLBACK_REVISION = "varlide-mirror"  # snapshot name when a file arrives without a revision
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MIRRORABLE = ("torch-hub", "hf", "cache", "package")
CHUNK = 1 << 20


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
    """``varlide/weights/``: the enhancers' shipped default weights."""
    return Path(__file__).resolve().parent / "weights"


def lock_path() -> Path:
    return cache_dir() / LOCK_NAME


def _split_hf(rest: str) -> tuple[str, str]:
    parts = rest.split("/")
    if len(parts) < 3:
        raise ValueError(f"hf location needs org/repo/file, got {rest!r}")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hf_repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def _hf_path(repo: str, filename: str, revision: str | None, for_write: bool) -> Path:
    base = _hf_repo_dir(repo)
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
        repo, filename = _split_hf(rest)
        return _hf_path(repo, filename, revision, for_write)
    raise ValueError(f"unknown weights location scheme {scheme!r} in {location!r}")


def location_key(location: str) -> str | None:
    """The file's key (its path in a mirror), None for a user's own ``file:``."""
    scheme, _, rest = location.partition(":")
    return f"{scheme}/{rest}" if scheme in MIRRORABLE else None


def _hf_mark_main(location: str, path: Path) -> None:
    """A file written into an hf snapshot: make ``refs/main`` point at that snapshot."""
    if not location.startswith("hf:"):
        return
    repo, filename = _split_hf(location[3:])
    ref = _hf_repo_dir(repo) / "refs" / "main"
    if not ref.is_file():
        rev = path.parts[len(path.parts) - len(Path(filename).parts) - 1]
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(rev)


# --------------------------------------------------------------------------- registry


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


def _pyiqa(name: str) -> WeightFile:
    return WeightFile(f"torch-hub:pyiqa/{name}", f"{PYIQA_BASE}/{name}", "pyiqa")


def _torchvision(name: str) -> WeightFile:
    return WeightFile(f"torch-hub:checkpoints/{name}", f"{TORCHVISION_BASE}/{name}",
                      "torchvision")


def hf_file(repo: str, filename: str, kind: str = "hf") -> WeightFile:
    return WeightFile(f"hf:{repo}/{filename}", f"{HF_BASE}/{repo}/resolve/main/{filename}", kind)


_OPENAI_RN50 = ("https://openaipublic.azureedge.net/clip/models/"
                "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")
_CLIP_RN50 = WeightFile("torch-hub:clip/RN50.pt", _OPENAI_RN50, "pyiqa",
                        sha256=_OPENAI_RN50.split("/")[-2])
_MANIQA_VIT = hf_file("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", "model.safetensors",
                      "timm")

# Files each learned pyiqa metric (0.1.16) reads when it is built; pyiqa downloads them on
# first use into its cache, which a worker cannot do. Checked by tests against pyiqa's source.
PYIQA_FILES: dict[str, tuple[WeightFile, ...]] = {
    "niqe": (_pyiqa("niqe_modelparameters.mat"),),
    "niqe_matlab": (_pyiqa("niqe_matlab_params.mat"),),
    "ilniqe": (_pyiqa("ILNIQE_templateModel.mat"),),
    "brisque": (_pyiqa("brisque_svm_weights.pth"),),
    "brisque_matlab": (_pyiqa("brisque_matlab.mat"),),
    "musiq": (_pyiqa("musiq_koniq_ckpt-e95806b9.pth"),),
    "musiq-ava": (_pyiqa("musiq_ava_ckpt-e8d3f067.pth"),),
    "musiq-spaq": (_pyiqa("musiq_spaq_ckpt-358bb6af.pth"),),
    "musiq-paq2piq": (_pyiqa("musiq_paq2piq_ckpt-364c0c84.pth"),),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt"), _MANIQA_VIT),
    "maniqa-kadid": (_pyiqa("ckpt_kadid10k.pt"), _MANIQA_VIT),
    "maniqa-pipal": (_pyiqa("MANIQA_PIPAL-ae6d356b.pth"), _MANIQA_VIT),
    "clipiqa": (_CLIP_RN50,),
    "clipiqa+": (_CLIP_RN50, _pyiqa("CLIP-IQA+_learned_prompts-603f3273.pth")),
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth"), _torchvision("alexnet-owt-7be5be79.pth")),
    "lpips-vgg": (_pyiqa("LPIPS_v0.1_vgg-a78928a0.pth"), _torchvision("vgg16-397923af.pth")),
}
# pyiqa metrics that read no file at all (work offline as installed).
WEIGHT_FREE_PYIQA = frozenset({
    "piqe", "psnr", "psnry", "ssim", "ssimc", "ms_ssim", "cw_ssim", "fsim", "vif", "gmsd",
    "nlpd", "vsi", "mad", "entropy",
})


def metric_files(name: str) -> tuple[WeightFile, ...] | None:
    """Files a pyiqa metric needs: () for a weight-free one, None when not catalogued."""
    if name in WEIGHT_FREE_PYIQA:
        return ()
    return PYIQA_FILES.get(name)


# --- CLIP checkpoints


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


SUPPORTED_CLIP_MODELS = ("ViT-B-32:openai", "ViT-B-16:openai", "RN50:openai",
                         "ViT-L-14:openai", "ViT-B-32:laion2b_s34b_b79k")


# --- enhancers and calibrations

ENHANCERS_WITH_DEFAULT_WEIGHTS = ("varlide-lite", "zero-dce")


def enhancer_files(name: str, weights: str | None) -> list[WeightFile]:
    note = (f"made by `varlide train DATA OUT --enhancer {name}`; copy OUT/final/ to "
            f"{package_dir() / name}/ or pass --weights")
    if weights:
        if weights.startswith("models:/"):  # MLflow registry: downloaded to the cache up front
            from varlide.registry_mlflow import resolve_model_uri

            weights = resolve_model_uri(weights)
        if "://" in weights and not weights.startswith("file://"):
            return []  # a remote folder: read by the enhancer's own loader, errors name it
        p = Path(weights.removeprefix("file://")).expanduser().resolve()
        files = [p, p.parent / "config.json"] if p.suffix == ".safetensors" else [
            p / "model.safetensors", p / "config.json"]
        return [WeightFile(f"file:{f}", None, "enhancer", note=note) for f in files]
    if name in ENHANCERS_WITH_DEFAULT_WEIGHTS or (package_dir() / name).is_dir():
        return [WeightFile(f"package:{name}/{f}", None, "enhancer", note=note)
                for f in ("model.safetensors", "config.json")]
    return []


def calibration_location(source: str, target: str) -> str:
    """Where ``varlide calibrate`` stores the map from prior ``source`` onto ``target``
    (each ``backend/model``), beside the other weights so they are mirrored together."""
    def slug(s: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)

    return f"cache:calibrations/{slug(source)}--to--{slug(target)}.json"


# --------------------------------------------------------------------------- requirements


def requirements(cfg: Config, *, include_reference: bool = False,
                 trained: tuple[str | None, str | None] | None = None,
                 with_calibration: bool = True) -> list[Requirement]:
    """Every file a config needs: the prior's, each pyiqa metric's, the enhancer's and (when
    the prior differs from the enhancer's trained one) the calibration's (optional unless
    ``prior_calibration`` names one)."""
    reqs: list[Requirement] = []
    backend = cfg.prior
    model = cfg.prior_model
    if backend == "auto":
        from varlide.priors.calibration import resolve_auto_prior, trained_prior_of

        backend, model = resolve_auto_prior(cfg, trained_prior_of(cfg) if trained is None
                                            else trained)
    if backend == "clip":
        spec = parse_clip_model(model)
        reqs += [Requirement(f, f"prior clip {spec.label}") for f in clip_files(spec)]
    names = list(cfg.metrics)
    if include_reference or cfg.reference:
        names += [m for m in cfg.reference_metrics if m not in names]
    for name in names:
        for f in metric_files(name) or ():
            reqs.append(Requirement(f, f"metric {name}"))
    if cfg.enhance:
        reqs += [Requirement(f, f"enhancer {cfg.enhancer}")
                 for f in enhancer_files(cfg.enhancer, cfg.enhancer_weights)]
    if with_calibration:
        from varlide.priors.calibration import calibration_requirement

        req = calibration_requirement(cfg, trained)
        if req is not None:
            reqs.append(req)
    return _dedupe(reqs)


def uncatalogued_metrics(cfg: Config, include_reference: bool = False) -> list[str]:
    """pyiqa metric names of the config whose files this registry does not know."""
    from varlide.iqa.base import metric_info

    names = list(cfg.metrics) + (list(cfg.reference_metrics)
                                 if include_reference or cfg.reference else [])
    out = []
    for n in dict.fromkeys(names):
        try:
            info = metric_info(n)
        except KeyError:
            continue
        if info.source == "pyiqa" and metric_files(n) is None:
            out.append(n)
    return out


def _dedupe(reqs: Iterable[Requirement]) -> list[Requirement]:
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


# --------------------------------------------------------------------------- lock file


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (several workers sync at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lck", "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: best effort
            pass
        yield


def read_lock(path: Path | None = None) -> dict[str, Any]:
    path = path or lock_path()
    if not path.is_file():
        return {"format": LOCK_FORMAT, "files": {}}
    data = json.loads(path.read_text())
    if data.get("format") != LOCK_FORMAT:
        raise WeightsError(f"{path}: not a varlide weights lock file ({data.get('format')!r})")
    return data


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def update_lock(entries: dict[str, dict[str, Any]], path: Path | None = None) -> dict[str, Any]:
    """Merge ``key -> entry`` into the local lock file (read-modify-write under a lock)."""
    path = path or lock_path()
    with _locked(path):
        lock = read_lock(path)
        lock["files"].update(entries)
        lock["updated_at"] = datetime.now(UTC).isoformat()
        _write_json_atomic(path, lock)
    return lock


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def lock_entry(wf: WeightFile, path: Path | None = None) -> dict[str, Any]:
    path = path or wf.path()
    entry = {"location": wf.location, "kind": wf.kind, "source": wf.url,
             "size": path.stat().st_size, "sha256": sha256_file(path)}
    if wf.location.startswith("hf:"):  # the snapshot it sits in: .../snapshots/<rev>/<file>
        repo, _ = _split_hf(wf.location[3:])
        entry["revision"] = path.relative_to(_hf_repo_dir(repo) / "snapshots").parts[0]
    return entry


def record(wfs: Iterable[WeightFile]) -> dict[str, Any]:
    """Add present files to the lock (size + sha256); returns the lock."""
    entries = {wf.key: lock_entry(wf) for wf in wfs if wf.key and wf.present()}
    return update_lock(entries)


# --------------------------------------------------------------------------- transfer


def _copy_to_local(src_uri: str, dest: Path, expect_sha: str | None = None,
                   what: str = "") -> tuple[int, str]:
    """Stream any fsspec URI or http(s) URL into ``dest`` (temp + rename), hashing on the
    way; a checksum mismatch leaves nothing behind and names the file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    h, size = hashlib.sha256(), 0
    try:
        with _open_source(src_uri) as src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        digest = h.hexdigest()
        if expect_sha and not digest.startswith(expect_sha):
            raise WeightsError(f"{what or dest}: sha256 {digest[:12]} of the copy from {src_uri} "
                               f"does not match the expected {expect_sha[:12]}; not installed")
        os.replace(tmp, dest)
        return size, digest
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _open_source(uri: str):
    if uri.startswith(("http://", "https://")):
        import urllib.request

        req = urllib.request.Request(uri, headers={"User-Agent": "varlide-weights"})
        token = os.environ.get("HF_TOKEN")
        if token and uri.startswith(HF_BASE):
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            yield resp
        return
    from varlide.storage.uri import filesystem

    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        yield fh


def _put(local: Path, uri: str) -> None:
    from varlide.storage.uri import filesystem

    fs, path = filesystem(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), path)


def _join(base: str, key: str) -> str:
    from varlide.storage.uri import join

    return join(base, key)


@dataclass
class Action:
    key: str
    path: str
    what: str  # 'present' / 'pulled' / 'synced' / 'mirrored' / 'failed' ...
    detail: str = ""


def pull(reqs: Iterable[Requirement], hub: str | None = None,
         progress: bool = True) -> list[Action]:
    """Download every missing file (from ``hub``/<key> when given, else its source), then
    record size and sha256 of every present one in the lock file."""
    out: list[Action] = []
    done: list[WeightFile] = []
    reqs = list(reqs)
    for i, r in enumerate(reqs):
        wf = r.file
        if progress:
            print(f"[{i + 1}/{len(reqs)}] {wf.key or wf.location}", file=sys.stderr)
        if wf.present():
            out.append(Action(wf.key or wf.location, str(wf.path()), "present"))
            done.append(wf)
            continue
        src = _join(hub, wf.key) if hub and wf.key else wf.url
        if not src:
            out.append(Action(wf.key or wf.location, str(wf.path()),
                              "absent" if r.optional else "failed",
                              f"no download source: {wf.note or 'given by the user'}"))
            continue
        dest = location_path(wf.location, for_write=True)
        try:
            _copy_to_local(src, dest, wf.sha256, what=wf.key or wf.location)
        except Exception as exc:  # report and go on with the others
            out.append(Action(wf.key or wf.location, str(dest),
                              "absent" if r.optional else "failed",
                              f"{type(exc).__name__}: {exc}"))
            continue
        _hf_mark_main(wf.location, dest)
        out.append(Action(wf.key or wf.location, str(dest), "pulled", src))
        done.append(wf)
    record(done)
    return out


def mirror(uri: str, reqs: Iterable[Requirement] = ()) -> list[Action]:
    """Copy every locked file (plus present ``reqs``, locked first) and the lock file to
    ``uri`` (a bucket prefix or a folder): the mirror that workers ``sync`` from."""
    record(r.file for r in reqs if r.file.key)
    lock = read_lock()
    out: list[Action] = []
    for key, entry in sorted(lock["files"].items()):
        path = location_path(entry["location"], entry.get("revision"))
        if not path.is_file():
            raise WeightsError(f"cannot mirror {key}: {path} is missing locally "
                               "(`varlide weights pull` first)")
        if path.stat().st_size != entry["size"]:
            raise WeightsError(f"cannot mirror {key}: {path} differs from the lock file "
                               "(`varlide weights verify`)")
        _put(path, _join(uri, key))
        out.append(Action(key, _join(uri, key), "mirrored"))
    from varlide.storage.uri import filesystem

    fs, p = filesystem(_join(uri, LOCK_NAME))
    fs.pipe_file(p, (json.dumps(lock, indent=1, sort_keys=True) + "\n").encode())
    return out


def read_remote_lock(uri: str) -> dict[str, Any]:
    from varlide.storage.uri import filesystem

    fs, p = filesystem(_join(uri, LOCK_NAME))
    try:
        data = json.loads(fs.cat_file(p))
    except FileNotFoundError:
        raise WeightsError(f"no {LOCK_NAME} at {uri}: not a weights mirror "
                           "(create it with `varlide weights mirror URI`)") from None
    if data.get("format") != LOCK_FORMAT:
        raise WeightsError(f"{uri}/{LOCK_NAME}: not a varlide weights lock file")
    return data


def sync(uri: str, keys: Iterable[str] | None = None) -> list[Action]:
    """Fill the local caches from a mirror: every file of its lock (or only ``keys``) that
    is absent or differs here is copied, checked against the lock's sha256, and put where
    its library looks; the local lock file gets the entries."""
    remote = read_remote_lock(uri)
    local = read_lock()["files"]
    wanted = None if keys is None else set(keys)
    out: list[Action] = []
    entries: dict[str, dict[str, Any]] = {}
    for key, entry in sorted(remote["files"].items()):
        if wanted is not None and key not in wanted:
            continue
        path = location_path(entry["location"], entry.get("revision"))
        if path.is_file() and path.stat().st_size == entry["size"] and (
                local.get(key, {}).get("sha256") == entry["sha256"]
                or sha256_file(path) == entry["sha256"]):
            out.append(Action(key, str(path), "present"))
            entries[key] = entry
            continue
        dest = location_path(entry["location"], entry.get("revision"), for_write=True)
        _copy_to_local(_join(uri, key), dest, entry["sha256"], what=key)
        _hf_mark_main(entry["location"], dest)
        entries[key] = entry
        out.append(Action(key, str(dest), "synced"))
    if entries:
        update_lock(entries)
    return out


def verify(keys: Iterable[str] | None = None) -> list[Action]:
    """Re-hash every locked file (or ``keys``); an Action per file, ``what`` 'ok' or 'FAILED'
    with the reason (missing, size, sha256)."""
    lock = read_lock()
    wanted = None if keys is None else set(keys)
    out = []
    for key, entry in sorted(lock["files"].items()):
        if wanted is not None and key not in wanted:
            continue
        path = location_path(entry["location"], entry.get("revision"))
        if not path.is_file():
            out.append(Action(key, str(path), "FAILED", "missing"))
        elif path.stat().st_size != entry["size"]:
            out.append(Action(key, str(path), "FAILED",
                              f"size {path.stat().st_size} != locked {entry['size']}"))
        else:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                out.append(Action(key, str(path), "FAILED", f"sha256 {digest[:12]} != locked "
                                  f"{entry['sha256'][:12]} (corrupt or replaced)"))
            else:
                out.append(Action(key, str(path), "ok"))
    return out


# --------------------------------------------------------------------------- workers


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


_PREPARED: set[str] = set()
_SYNC_LOCK = threading.Lock()


def prepare_worker(cfg: Config, reqs: list[Requirement] | None = None) -> None:
    """Before a worker builds models (once per process and config): weights cache from the
    config, offline switches, a sync of the needed files (and calibrations) from
    ``weights_mirror``, then the check of every required file."""
    if cfg.weights_cache:
        os.environ["VARLIDE_WEIGHTS_CACHE"] = cfg.weights_cache
    set_offline(not cfg.weights_online)
    marker = f"{cfg.model_dump_json()}|{cache_dir()}|{torch_hub_dir()}|{hf_cache_dir()}"
    with _SYNC_LOCK:
        if marker in _PREPARED:
            return
        if cfg.weights_mirror:
            remote = read_remote_lock(cfg.weights_mirror)["files"]
            needed = {r.file.key for r in requirements(cfg, with_calibration=False)}
            keys = [k for k in remote if k in needed or k.startswith("cache/calibrations/")]
            acts = sync(cfg.weights_mirror, keys=keys)
            n = sum(a.what == "synced" for a in acts)
            if n:
                log.info("weights: %d file(s) synced from %s", n, cfg.weights_mirror)
        check(requirements(cfg) if reqs is None else reqs, online=cfg.weights_online)
        _PREPARED.add(marker)


def preflight(cfg: Config) -> list[Requirement]:
    """Before a run starts (CLI, dry run): every required file present here, or listed in
    ``weights_mirror``'s lock file for workers to sync; else ``WeightsMissingError``."""
    if cfg.weights_cache:
        os.environ["VARLIDE_WEIGHTS_CACHE"] = cfg.weights_cache
    reqs = requirements(cfg)
    gone = missing(reqs)
    if gone and cfg.weights_mirror:
        mirrored = set(read_remote_lock(cfg.weights_mirror)["files"])
        gone = [r for r in gone if r.file.key not in mirrored]
    if cfg.weights_online:
        gone = [r for r in gone if not r.file.url]
    check(gone)
    return reqs


def describe(reqs: Iterable[Requirement]) -> list[dict[str, Any]]:
    """Rows for ``varlide weights list`` / ``--dry-run``: what, where, present, locked."""
    lock = read_lock()["files"]
    rows = []
    for r in reqs:
        path = r.file.path()
        entry = lock.get(r.file.key or "", {})
        rows.append({
            "used_by": r.used_by, "kind": r.file.kind, "key": r.file.key or r.file.location,
            "path": str(path), "present": path.is_file(), "optional": r.optional,
            "size": path.stat().st_size if path.is_file() else None,
            "sha256": entry.get("sha256"), "source": r.file.url,
        })
    return rows


def catalogue() -> list[Requirement]:
    """Every file this registry knows by name: the supported CLIP models' checkpoints, each
    catalogued pyiqa metric's files, the enhancers' default weights, stored calibrations."""
    reqs = [Requirement(f, f"metric {name}", optional=True)
            for name, files in PYIQA_FILES.items() for f in files]
    for spec in SUPPORTED_CLIP_MODELS:
        arch, tag = spec.split(":", 1)
        try:
            reqs.append(Requirement(clip_checkpoint(arch, tag), f"prior clip {spec}", True))
        except ValueError:  # not in this open_clip version
            continue
    with _REG_LOCK:
        extra = dict(_CLIP_EXTRA)
    reqs += [Requirement(f, f"prior clip {a}:{t}", True) for (a, t), f in extra.items()]
    for name in ENHANCERS_WITH_DEFAULT_WEIGHTS:
        reqs += [Requirement(f, f"enhancer {name}", True) for f in enhancer_files(name, None)]
    for p in sorted((cache_dir() / "calibrations").glob("*.json")):
        reqs.append(Requirement(WeightFile(f"cache:calibrations/{p.name}", None,
                                           "calibration"), "calibration", True))
    return _dedupe(reqs)


def calibrations_state() -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of the stored calibrations: part of a worker's stage key, so a
    long-lived worker picks up a calibration made after it started (on the next run)."""
    folder = cache_dir() / "calibrations"
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                        if e.name.endswith(".json")))
