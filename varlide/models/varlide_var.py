"""``varlide-var``: VICM -> the VARSR backbone -> VGPM, the seed's VAR-LIDE pipeline.

VICM brightens (the same curve module as ``varlide-lite``); its output, mapped to [-1, 1],
is the LR conditioning of a VARSR restorer (``varlide.models.var``: tokenizer, transformer
with SA-RoPE, diffusion refiner, CFG sampling); VGPM refines the result when the weights
have one. Routing as ``varlide-lite``'s: a frame inside the exposure skip band is its own
output; every other frame takes the route ``full``.

Any resolution: the curve runs on the whole frame; the backbone on tiles of its own size
(512 px for the released model) overlapping by ``overlap`` px, gathered across the tiles
and the images of a batch and blended back (``varlide.models.tiles``), or on the frame
resized to one tile (``tile_mode: resize``). The tile plan is part of the version.

Weights, a folder: ``varsr.safetensors`` and ``vqvae.safetensors`` (the authors' two files
after ``varlide weights convert``; no VAR weights ship and none are downloaded here), and
optionally ``model.safetensors`` + ``config.json`` (the trainable front end, VICM and
VGPM, and the sizes). Without ``model.safetensors`` the curve comes from the shipped
``varlide-lite`` weights. The version is ``<front sha12>+var<sha8>+vae<sha8>+<tiles>``,
plus ``+hl`` when highlights roll off (``tone.protect_highlights``, as varlide-lite).

At the released size a 512x512 tile takes ~14 TFLOP: minutes on a CPU. So on CPU the
enhancer refuses full-size backbones unless ``allow_cpu=True`` (``enhancer_options:
{allow_cpu: true}``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, autocast_for
from varlide.models.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _load_safetensors,
    check_state_dict,
    default_weights_dir,
    weights_sha256,
)
from varlide.models.tiles import TilePlan, map_tiles
from varlide.models.tone import protect_highlights
from varlide.models.vgpm import LOW_BAND, VGPM
from varlide.models.vicm import VICM

NAME = "varlide-var"
FORMAT = "varlide-var-1"
BACKBONE_FILES = {"var": "varsr.safetensors", "vae": "vqvae.safetensors"}
SKIP_VISIBILITY = (0.87, 0.97)  # varlide-lite's band (the analytic prior's scale)
FULL_SIZE_WIDTH = 1024  # a transformer this wide is "full size": refused on CPU by default


@dataclass
class VarlideVarConfig:
    """Architecture and sampling (config.json's ``model``); sizes default to the release."""

    n_iter: int = 8  # VICM, as varlide-lite
    width: int = 32
    downscale: float = 1.0
    vicm: bool = True
    hidden: int = 16
    vgpm: bool = False  # the shipped curve weights have none (docs/METHOD.md)
    vgpm_steps: int = 8
    vgpm_width: int = 16
    low_band: float = LOW_BAND
    transformer: dict[str, Any] = field(default_factory=dict)  # VARSRModel keywords
    tokenizer: dict[str, Any] = field(default_factory=dict)  # MultiScaleVQVAE keywords
    overlap: int = 64
    tile_mode: str = "tile"  # tile | resize
    tile_batch: int = 4  # tiles per backbone call (the CFG batch is twice that)
    cfg: float = 6.0  # the authors' test settings
    top_k: int = 1
    top_p: float = 0.75
    refine: bool = True
    colour_fix: bool = True
    seed: int = 0


def _json_ready(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))


class VarlideVar(Enhancer):
    """The enhancer: ``enhance(images, v, b)``; weights through ``from_pretrained``."""

    name = NAME

    def __init__(self, config: VarlideVarConfig | None = None, *,
                 skip_visibility: tuple[float, float] | None = SKIP_VISIBILITY,
                 allow_cpu: bool = False, highlights: bool = True,
                 precision: str = "auto") -> None:
        from varlide.models.var import MultiScaleVQVAE
        from varlide.models.var.varsr import VARSRModel

        super().__init__()
        self.config = c = config or VarlideVarConfig()
        self.vicm = VICM(n_iter=c.n_iter, width=c.width, downscale=c.downscale,
                         adaptive=c.vicm, hidden=c.hidden)
        self.vgpm = (VGPM(steps=c.vgpm_steps, width=c.vgpm_width, low_band=c.low_band,
                          hidden=c.hidden) if c.vgpm else None)
        self.var = VARSRModel(**c.transformer)
        self.vae = MultiScaleVQVAE(**c.tokenizer)
        for p in [*self.var.parameters(), *self.vae.parameters()]:
            p.requires_grad_(False)  # the backbone is frozen: only the front end trains
        self.skip_visibility = skip_visibility
        self.allow_cpu, self.highlights, self.precision = allow_cpu, highlights, precision
        tile = self.vae.image_size  # overlap at most 1/8 of a tile (64 px of 512)
        self.plan = TilePlan(tile=tile, overlap=min(c.overlap, tile // 8), mode=c.tile_mode,
                             batch=c.tile_batch)
        self.hashes = {"front": "untrained", "var": "random", "vae": "random"}
        self.trained_prior, self.trained_prior_model = "analytic", None

    @property
    def version(self) -> str:
        h = self.hashes
        hl = "+hl" if self.highlights else ""
        return f"{h['front'][:12]}+var{h['var'][:8]}+vae{h['vae'][:8]}+{self.plan.tag()}{hl}"

    @property
    def full_size(self) -> bool:
        return self.var.width >= FULL_SIZE_WIDTH

    def front_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (VICM, VGPM): what ``model.safetensors`` holds."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("vicm.", "vgpm."))}

    # ---------------------------------------------------------------- inference

    def routes(self, v: torch.Tensor) -> list[str]:
        band = self.skip_visibility
        return ["skip" if band and band[0] <= vi <= band[1] else "full"
                for vi in v.float().cpu().tolist()]

    def _backbone(self, tiles01: torch.Tensor) -> torch.Tensor:
        from varlide.models.var.varsr import restore

        c = self.config
        return restore(self.var, self.vae, tiles01.clamp(0, 1), cfg=c.cfg, top_k=c.top_k,
                       top_p=c.top_p, seed=c.seed, refine=c.refine, colour_fix=c.colour_fix,
                       amp_dtype="auto" if self.precision == "auto" else None)

    def _check_device(self, device: torch.device) -> None:
        if device.type == "cpu" and self.full_size and not self.allow_cpu:
            raise RuntimeError(
                "varlide-var: the full-size VAR backbone on a CPU takes minutes per 512x512 "
                "tile; run it on a GPU (--device cuda), or force it with enhancer_options: "
                "{allow_cpu: true}")

    @torch.no_grad()
    def enhance(self, images: torch.Tensor, visibility: torch.Tensor,
                blur: torch.Tensor) -> EnhanceResult:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        n, dev = images.shape[0], images.device
        v = torch.as_tensor(visibility, device=dev).float().reshape(-1)
        b = torch.as_tensor(blur, device=dev).float().reshape(-1)
        routes = self.routes(v)
        out = images.float().clone()
        res = EnhanceResult(images=out, route=routes,
                            n_iter=torch.zeros(n, dtype=torch.int16, device=dev),
                            phase_strength=torch.zeros(n, device=dev) if self.vgpm else None)
        sel = [i for i, r in enumerate(routes) if r == "full"]
        if not sel:
            return res
        self._check_device(dev)
        idx = torch.tensor(sel, device=dev)
        x = out.index_select(0, idx)
        with autocast_for(dev, "fp32"):
            r = self.vicm(x, v.index_select(0, idx), mask="hard")
        y = map_tiles(self._backbone, r["image"].float().clamp(0, 1), self.plan)
        if self.vgpm is not None:
            g = self.vgpm(y, b.index_select(0, idx))
            y = g["image"]
            res.phase_strength.index_copy_(0, idx, g["strength"].float())
        y = y.float().clamp_(0, 1).contiguous()
        if self.highlights:
            protect_highlights(y, x)
        out.index_copy_(0, idx, y)
        res.n_iter.index_copy_(0, idx, r["n_iter"].to(torch.int16))
        return res

    # ---------------------------------------------------------------- weights

    def save_pretrained(self, out: str | Path) -> str:
        """A weights folder: the front end (``model.safetensors`` + ``config.json``) and the
        backbone files; returns the version."""
        from safetensors.torch import save

        from varlide.storage.uri import join, write_bytes

        out = str(out)
        parts = {WEIGHTS_FILE: self.front_state(),
                 BACKBONE_FILES["var"]: self.var.state_dict(),
                 BACKBONE_FILES["vae"]: self.vae.state_dict()}
        digests = {}
        for fname, state in parts.items():
            data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
            write_bytes(join(out, fname), data)
            digests[fname] = weights_sha256(data)
        meta = {"format": FORMAT, "enhancer": NAME,
                "model": _json_ready(dataclasses.asdict(self.config)),
                "sha256": digests, "trained_prior": self.trained_prior}
        write_bytes(join(out, CONFIG_FILE), json.dumps(meta, indent=1).encode())
        self.hashes = {"front": digests[WEIGHTS_FILE], "var": digests[BACKBONE_FILES["var"]],
                       "vae": digests[BACKBONE_FILES["vae"]]}
        return self.version

    @classmethod
    def from_pretrained(cls, folder: str | Path, **inference: Any) -> VarlideVar:
        """Load a weights folder (see the module docstring); missing backbone files are a
        ``FileNotFoundError`` that names them and the commands that make them."""
        folder, meta = read_folder(folder)
        model = cls(VarlideVarConfig(**meta.get("model", {})), **inference)
        for part, fname in BACKBONE_FILES.items():
            data = (folder / fname).read_bytes()
            state = _load_safetensors(data, str(folder / fname))
            module = model.var if part == "var" else model.vae
            check_state_dict(module, state, f"{NAME} {fname}")
            module.load_state_dict(state, strict=True)
            model.hashes[part] = weights_sha256(data)
        model._load_front(folder)
        return model

    def _load_front(self, folder: Path) -> None:
        """VICM (and VGPM) from ``model.safetensors``, else the shipped varlide-lite curve."""
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            path = default_weights_dir("varlide-lite") / WEIGHTS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{NAME}: no {WEIGHTS_FILE} in {folder}, and the "
                                        f"shipped varlide-lite curve ({path}) is missing too")
        data = path.read_bytes()
        state = {k: v for k, v in _load_safetensors(data, str(path)).items()
                 if k.startswith(("vicm.", "vgpm."))}
        if self.vgpm is None:
            state = {k: v for k, v in state.items() if k.startswith("vicm.")}
        own = self.front_state()
        check_state_dict(_Front(own), state, f"{NAME} front end {path}")
        self.load_state_dict(state, strict=False)
        self.hashes["front"] = weights_sha256(data)


def read_folder(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """A weights folder's path and its config.json (``{"model": {}}`` when absent): missing
    backbone files are a ``FileNotFoundError`` that names them and the commands that make
    them; another enhancer's folder is a ``ValueError``."""
    folder = Path(str(folder).removeprefix("file://")).expanduser()
    missing = [folder / f for f in BACKBONE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(missing_backbone_message(missing))
    meta = json.loads((folder / CONFIG_FILE).read_text()) if (
        folder / CONFIG_FILE).is_file() else {"model": {}}
    if meta.get("enhancer", NAME) != NAME:
        raise ValueError(f"{folder} holds weights of {meta.get('enhancer')!r}, not {NAME}")
    return folder, meta


def check_weights(folder: str | Path, **inference: Any) -> None:
    """What ``from_pretrained`` would refuse, from the files' headers alone (no tensor is
    read: the backbone files are gigabytes): missing files, and names or shapes that differ
    from the model the folder's config builds (on the meta device)."""
    from safetensors import safe_open

    folder, meta = read_folder(folder)
    with torch.device("meta"):
        model = VarlideVar(VarlideVarConfig(**meta.get("model", {})), **inference)
    for part, fname in BACKBONE_FILES.items():
        want = {k: tuple(v.shape) for k, v in (model.var if part == "var" else model.vae
                                                ).state_dict().items()}
        with safe_open(str(folder / fname), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        problems = sorted(set(want) ^ set(got))[:3] + [
            f"{k}: {got[k]} != {want[k]}" for k in sorted(set(want) & set(got))
            if got[k] != want[k]][:3]
        if problems:
            raise ValueError(f"{NAME} {fname} does not fit the model: {'; '.join(problems)}")


class _Front(torch.nn.Module):
    """A state-dict holder for ``check_state_dict`` on the front-end tensors alone."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._tensors


def missing_backbone_message(missing: list[Path]) -> str:
    names = ", ".join(str(p) for p in missing)
    return (f"{NAME}: missing backbone file(s) {names}. No VAR weights ship with varlide. "
            "Fetch the authors' VARSR.pth and VQVAE.pth (Hugging Face hub qyp2000/VARSR; "
            "`varlide weights pull --all` on a machine with internet), then convert each "
            "once: `varlide weights convert VARSR.pth DIR/varsr.safetensors --dtype fp16` "
            "and `varlide weights convert VQVAE.pth DIR/vqvae.safetensors`, and pass "
            "--weights DIR")


def weight_files(weights: str | None) -> list:
    """The files a run with ``weights`` needs (preflight names them when missing); no
    weights at all is the same error, before anything starts (none ship)."""
    from varlide.weights.files import WeightFile, WeightsMissingError

    if not weights:
        raise WeightsMissingError(missing_backbone_message(
            [Path("DIR") / f for f in BACKBONE_FILES.values()]))
    folder = Path(str(weights).removeprefix("file://")).expanduser().resolve()
    note = missing_backbone_message([folder / f for f in BACKBONE_FILES.values()])
    return [WeightFile(f"file:{folder / f}", None, "enhancer", note=note)
            for f in BACKBONE_FILES.values()]


def _release_files() -> list:
    from varlide.models.var.files import released_weight_files

    return released_weight_files()


@ENHANCERS.register(NAME, trainable=False, ships_weights=False, weight_files=weight_files,
                    release_files=_release_files, check_weights=check_weights)
def _make_varlide_var(weights: str | None = None, **kw: Any) -> VarlideVar:
    """``weights``: a folder (see the module docstring); there is no default."""
    if weights is None:
        raise FileNotFoundError(missing_backbone_message(
            [Path("DIR") / f for f in BACKBONE_FILES.values()]))
    return VarlideVar.from_pretrained(weights, **kw)
