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
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult, autocast_for
from varlide.models.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Pretrained,
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
    rope: str = "sa"  # sa: the release's SA-RoPE | sf: SF-RoPE (lambda starts at 0)
    sfrope: dict[str, Any] = field(default_factory=dict)  # SFRoPE keywords (fusion ...)
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
    st_temperature: float = 1.0  # training: softmax temperature of the straight-through codes

    def __post_init__(self) -> None:
        if self.rope not in ("sa", "sf"):
            raise ValueError(f"rope: 'sa' or 'sf', got {self.rope!r}")


TRAINABLE_PREFIXES = ("vicm.", "vgpm.", "var.rope.sfrope_")
"""State-dict prefixes of what fine-tuning trains and ``model.safetensors`` holds; the
backbone (``var`` but SF-RoPE's parameters, ``vae``) stays frozen."""


def _json_ready(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64


def _build_transformer(c: VarlideVarConfig):
    """VARSRModel at the config's sizes, with SF-RoPE in the rotary slot when ``rope: sf``."""
    from varlide.models.var.varsr import VARSRModel

    if c.rope == "sa":
        return VARSRModel(**c.transformer)
    from varlide.models.var.sfrope import SFRoPE

    sizes = {k: p.default for k, p in inspect.signature(VARSRModel).parameters.items()}
    sizes.update(c.transformer)
    rope = SFRoPE(sizes["width"] // sizes["heads"], tuple(sizes["patch_nums"]), sizes["cvae"],
                  sizes["prefix_side"], **c.sfrope)
    return VARSRModel(**c.transformer, rope=rope)


class VarlideVar(Pretrained, Enhancer):
    """The enhancer: ``enhance(images, v, b)``; training calls ``forward`` (one tile per
    crop, the backbone frozen); weights through ``from_pretrained``."""

    name = NAME
    config_class = VarlideVarConfig

    def __init__(self, config: VarlideVarConfig | None = None, *,
                 skip_visibility: tuple[float, float] | None = SKIP_VISIBILITY,
                 allow_cpu: bool = False, highlights: bool = True,
                 precision: str = "auto") -> None:
        from varlide.models.var import MultiScaleVQVAE

        super().__init__()
        self.config = c = config or VarlideVarConfig()
        self.vicm = VICM(n_iter=c.n_iter, width=c.width, downscale=c.downscale,
                         adaptive=c.vicm, hidden=c.hidden)
        self.vgpm = (VGPM(steps=c.vgpm_steps, width=c.vgpm_width, low_band=c.low_band,
                          hidden=c.hidden) if c.vgpm else None)
        self.var = _build_transformer(c)
        self.vae = MultiScaleVQVAE(**c.tokenizer)
        for name, p in self.named_parameters():  # only the front end and SF-RoPE train
            p.requires_grad_(name.startswith(TRAINABLE_PREFIXES))
        self.skip_visibility = skip_visibility
        self.allow_cpu, self.highlights, self.precision = allow_cpu, highlights, precision
        tile = self.vae.image_size  # overlap at most 1/8 of a tile (64 px of 512)
        self.plan = TilePlan(tile=tile, overlap=min(c.overlap, tile // 8), mode=c.tile_mode,
                             batch=c.tile_batch)
        self.hashes = {"front": "untrained", "var": "random", "vae": "random"}
        self.backbone_dir: Path | None = None
        self.trained_prior, self.trained_prior_model = "analytic", None

    @property
    def version(self) -> str:
        h = self.hashes
        hl = "+hl" if self.highlights else ""
        return f"{h['front'][:12]}+var{h['var'][:8]}+vae{h['vae'][:8]}+{self.plan.tag()}{hl}"

    @property
    def full_size(self) -> bool:
        return self.var.width >= FULL_SIZE_WIDTH

    def train(self, mode: bool = True) -> VarlideVar:
        """Training mode for the front end only: the frozen backbone keeps its inference
        behaviour (no drop-path)."""
        super().train(mode)
        self.var.eval()
        self.vae.eval()
        return self

    def front_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors (VICM, VGPM, SF-RoPE's): what ``model.safetensors`` holds."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def backbone_state(self, part: str) -> dict[str, torch.Tensor]:
        """``var`` or ``vae`` as the released file holds it (no SF-RoPE parameter)."""
        module = self.var if part == "var" else self.vae
        return {k: v for k, v in module.state_dict().items()
                if not k.startswith("rope.sfrope_")}

    # ---------------------------------------------------------------- training forward

    def forward(self, x: torch.Tensor, v: torch.Tensor, b: torch.Tensor, mask: str = "soft",
                temperature: float = 0.1) -> dict[str, torch.Tensor | None]:
        """Every image 'full' on crops of exactly one tile, differentiable: VICM, the backbone
        through :func:`~varlide.models.var.varsr.restore_straight_through` (greedy tokens,
        no refiner), VGPM. The keys of ``varlide-lite``'s forward."""
        from varlide.models.var.varsr import restore_straight_through

        side = self.plan.tile
        if x.ndim != 4 or x.shape[-2:] != (side, side):
            raise ValueError(f"{NAME} trains on crops of exactly one backbone tile: set crop "
                             f"and val_crop to {side}, got {tuple(x.shape)}")
        c = self.config
        r = self.vicm(x, v, mask=mask, temperature=temperature)
        y = restore_straight_through(self.var, self.vae, r["image"].clamp(0, 1), cfg=c.cfg,
                                     temperature=c.st_temperature, colour_fix=c.colour_fix)
        out: dict[str, torch.Tensor | None] = {
            "curve_image": r["image"], "maps": r["maps"], "tau": r["tau"],
            "weights": r["weights"], "n_iter": r["n_iter"], "phase": None, "strength": None}
        if self.vgpm is not None:
            g = self.vgpm(y, b)
            y = g["image"]
            out.update(phase=g["phase"], strength=g["strength"])
        out["image"] = y
        return out

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

    def save_pretrained(self, out: str | Path, extra: dict[str, Any] | None = None, *,
                        backbone: bool = False) -> str:
        """A weights folder: the trainable tensors (``model.safetensors``) and ``config.json``,
        which names the backbone by its files' sha256 (and its folder); with ``backbone``
        also the two backbone files. Returns the version."""
        from safetensors.torch import save

        from varlide.storage.uri import join, write_bytes

        out = str(out)
        parts = {WEIGHTS_FILE: self.front_state()}
        if backbone:
            parts.update({fname: self.backbone_state(part)
                          for part, fname in BACKBONE_FILES.items()})
        digests = {}
        for fname, state in parts.items():
            data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
            write_bytes(join(out, fname), data)
            digests[fname] = weights_sha256(data)
        for part, fname in BACKBONE_FILES.items():
            self.hashes[part] = digests.get(fname, self.hashes[part])
        self.hashes["front"] = digests[WEIGHTS_FILE]
        where = None if backbone or self.backbone_dir is None else str(self.backbone_dir)
        meta = {"format": FORMAT, "enhancer": NAME,
                "model": _json_ready(dataclasses.asdict(self.config)), "sha256": digests,
                "backbone": {"dir": where, **{f: self.hashes[p]
                                              for p, f in BACKBONE_FILES.items()}},
                "trained_prior": self.trained_prior,
                "trained_prior_model": self.trained_prior_model, **(extra or {})}
        write_bytes(join(out, CONFIG_FILE), json.dumps(meta, indent=1).encode())
        return self.version

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone: str | Path | None = None,
                        **inference: Any) -> VarlideVar:
        """Load a weights folder (see the module docstring). The backbone files come from
        ``backbone``, else the folder, else the folder its config.json names; missing
        ones are a ``FileNotFoundError`` naming them and the commands that make them, and
        a backbone other than the one the front end was trained with a ``ValueError``."""
        folder, meta, where = read_folder(folder, backbone)
        model = cls(cls.config_from_meta(meta), **inference)
        model._load_backbone(where, meta)
        model._load_front(folder)
        return model

    @classmethod
    def for_training(cls, options: dict[str, Any], init_from: str | None) -> VarlideVar:
        """The trainer's model: the backbone (and front end, when there is one) of the
        ``init_from`` folder, its config updated by ``options`` (e.g. ``rope: sf``, ``vgpm:
        true``); tensors the folder lacks keep their initial values (SF-RoPE's and VGPM's
        start where they change nothing)."""
        if not init_from:
            raise ValueError(f"{NAME} trains around a frozen VAR backbone: set init_from "
                             "(`varlide train ... --init-from DIR`) to a folder holding "
                             f"{' and '.join(BACKBONE_FILES.values())}. "
                             + missing_backbone_message([]))
        folder, meta, where = read_folder(init_from)
        model = cls(cls.config_from_meta({"model": {**meta.get("model", {}), **options}}))
        model._load_backbone(where, meta)
        model._load_front(folder, partial=True)
        return model

    def _load_backbone(self, where: Path, meta: dict[str, Any]) -> None:
        """Both backbone files, checked against the model (names, shapes, dtypes) and
        against the hashes ``meta`` names."""
        for part, fname in BACKBONE_FILES.items():
            data = (where / fname).read_bytes()
            state = _load_safetensors(data, str(where / fname))
            check_state_dict(_Front(self.backbone_state(part)), state, f"{NAME} {fname}",
                             cast_floats=True)  # `weights convert --dtype fp16` files
            (self.var if part == "var" else self.vae).load_state_dict(state, strict=False)
            digest = weights_sha256(data)
            want = meta.get("backbone", {}).get(fname)
            if _is_sha256(want) and want != digest:
                raise ValueError(f"{NAME}: {where / fname} (sha256 {digest[:12]}) is not the "
                                 f"backbone these weights were trained with ({want[:12]}); "
                                 "pass the folder that holds it (enhancer_options: "
                                 "{backbone: DIR})")
            self.hashes[part] = digest
        self.backbone_dir = where

    def _load_front(self, folder: Path, partial: bool = False) -> None:
        """The trainable tensors from ``model.safetensors``, else the shipped varlide-lite
        curve (its VICM only). ``partial``: tensors the file lacks keep their values."""
        path = folder / WEIGHTS_FILE
        shipped = not path.is_file()
        if shipped:
            path = default_weights_dir("varlide-lite") / WEIGHTS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{NAME}: no {WEIGHTS_FILE} in {folder}, and the "
                                        f"shipped varlide-lite curve ({path}) is missing too")
        data = path.read_bytes()
        state = {k: v for k, v in _load_safetensors(data, str(path)).items()
                 if k.startswith(TRAINABLE_PREFIXES)}
        if self.vgpm is None:
            state = {k: v for k, v in state.items() if not k.startswith("vgpm.")}
        own = self.front_state()
        if partial or shipped:
            own = {k: t for k, t in own.items() if k in state}
        check_state_dict(_Front(own), state, f"{NAME} front end {path}")
        self.load_state_dict(state, strict=False)
        self.hashes["front"] = weights_sha256(data)

    @classmethod
    def read_pretrained(cls, path_or_uri: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
        """(config.json, the trainable tensors, their sha256) of a folder or URI written by
        ``save_pretrained`` (a training checkpoint): what ``_adopt`` takes."""
        from varlide.models.pretrained import _join, _read

        uri = str(path_or_uri).rstrip("/")
        meta = json.loads(_read(_join(uri, CONFIG_FILE)))
        if meta.get("enhancer") != NAME:
            raise ValueError(f"{uri} holds weights of {meta.get('enhancer')!r}, not {NAME}")
        data = _read(_join(uri, WEIGHTS_FILE))
        digest = weights_sha256(data)
        want = meta.get("sha256", {}).get(WEIGHTS_FILE)
        if want and want != digest:
            raise ValueError(f"{uri}: {WEIGHTS_FILE} sha256 {digest[:12]} does not match its "
                             f"config.json ({want[:12]}); the file is corrupt or was replaced")
        return meta, _load_safetensors(data, uri), digest

    def _adopt(self, meta: dict, state: dict[str, torch.Tensor], digest: str) -> None:
        """Load a checkpoint's trainable tensors (all of them) after checking that it was
        trained around this model's backbone."""
        for part, fname in BACKBONE_FILES.items():
            want = meta.get("backbone", {}).get(fname)
            if _is_sha256(want) and want != self.hashes[part]:
                raise ValueError(f"{NAME}: this checkpoint was trained with {fname} "
                                 f"{want[:12]}, the model holds {self.hashes[part][:12]}")
        check_state_dict(_Front(self.front_state()), state, f"{NAME} weights {digest[:12]}")
        self.load_state_dict(state, strict=False)
        self.hashes["front"] = digest
        self.trained_prior = meta.get("trained_prior")
        self.trained_prior_model = meta.get("trained_prior_model")


def _read_config(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / CONFIG_FILE).read_text()) if (
        folder / CONFIG_FILE).is_file() else {"model": {}}
    if meta.get("enhancer", NAME) != NAME:
        raise ValueError(f"{folder} holds weights of {meta.get('enhancer')!r}, not {NAME}")
    return meta


def _backbone_candidates(folder: Path, meta: dict[str, Any],
                         backbone: str | Path | None = None) -> list[Path]:
    """Where the backbone files may be, in order: ``backbone``, else the folder, then the
    folder its config.json records (fine-tuned front ends do not copy the backbone)."""
    if backbone:
        return [Path(str(backbone).removeprefix("file://")).expanduser()]
    recorded = (meta.get("backbone") or {}).get("dir")
    return [folder] + ([Path(recorded)] if recorded else [])


def read_folder(folder: str | Path, backbone: str | Path | None = None
                ) -> tuple[Path, dict[str, Any], Path]:
    """A weights folder's path, its config.json (``{"model": {}}`` when absent) and the
    folder holding its backbone files: missing files are a ``FileNotFoundError`` that names
    them and the commands that make them; another enhancer's folder is a ``ValueError``."""
    folder = Path(str(folder).removeprefix("file://")).expanduser()
    meta = _read_config(folder)
    candidates = _backbone_candidates(folder, meta, backbone)
    for where in candidates:
        if all((where / f).is_file() for f in BACKBONE_FILES.values()):
            return folder, meta, where
    first = candidates[0]
    raise FileNotFoundError(missing_backbone_message(
        [first / f for f in BACKBONE_FILES.values() if not (first / f).is_file()],
        searched=candidates[1:]))


def check_weights(folder: str | Path, backbone: str | Path | None = None,
                  **inference: Any) -> None:
    """What ``from_pretrained`` would refuse, from the files' headers alone (no tensor is
    read: the backbone files are gigabytes): missing files, and names or shapes that differ
    from the model the folder's config builds (on the meta device)."""
    from safetensors import safe_open

    folder, meta, where = read_folder(folder, backbone)
    with torch.device("meta"):
        model = VarlideVar(VarlideVar.config_from_meta(meta), **inference)
    for part, fname in BACKBONE_FILES.items():
        want = {k: tuple(v.shape) for k, v in model.backbone_state(part).items()}
        with safe_open(str(where / fname), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        problems = sorted(set(want) ^ set(got))[:3] + [
            f"{k}: {got[k]} != {want[k]}" for k in sorted(set(want) & set(got))
            if got[k] != want[k]][:3]
        if problems:
            raise ValueError(f"{NAME} {fname} does not fit the model: {'; '.join(problems)}")


class _Front(torch.nn.Module):
    """A state-dict holder for ``check_state_dict`` on a subset of the model's tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._tensors


def missing_backbone_message(missing: list[Path], searched: list[Path] | None = None) -> str:
    names = ", ".join(str(p) for p in missing)
    where = (f" (nor in {', '.join(str(p) for p in searched)}, where the weights' "
             "config.json says the backbone is)") if searched else ""
    head = f"{NAME}: missing backbone file(s) {names}{where}. " if missing else ""
    return (f"{head}No VAR weights ship with varlide. "
            "Fetch the authors' VARSR.pth and VQVAE.pth (Hugging Face hub qyp2000/VARSR; "
            "`varlide weights pull --all` on a machine with internet), then convert each "
            "once: `varlide weights convert VARSR.pth DIR/varsr.safetensors --dtype fp16` "
            "and `varlide weights convert VQVAE.pth DIR/vqvae.safetensors`, and pass "
            "--weights DIR (training: --init-from DIR)")


def weight_files(weights: str | None) -> list:
    """The files a run with ``weights`` needs (preflight names them when missing); no
    weights at all is the same error, before anything starts (none ship)."""
    from varlide.weights.files import WeightFile, WeightsMissingError

    if not weights:
        raise WeightsMissingError(missing_backbone_message(
            [Path("DIR") / f for f in BACKBONE_FILES.values()]))
    folder = Path(str(weights).removeprefix("file://")).expanduser().resolve()
    try:
        _, _, where = read_folder(folder)
    except (FileNotFoundError, ValueError):
        where = folder  # preflight names the missing files (a wrong folder fails there too)
    note = missing_backbone_message([where / f for f in BACKBONE_FILES.values()])
    return [WeightFile(f"file:{where / f}", None, "enhancer", note=note)
            for f in BACKBONE_FILES.values()]


def _release_files() -> list:
    from varlide.models.var.files import released_weight_files

    return released_weight_files()


@ENHANCERS.register(NAME, trainable=True, model=VarlideVar, default_loss="varlide",
                    ships_weights=False, weight_files=weight_files,
                    release_files=_release_files, check_weights=check_weights,
                    train_defaults={"crop": 512, "val_crop": 512, "batch_size": 2,
                                    "lr": 1e-4, "lr_final": 0.1, "warmup": 20,
                                    "steps": 400, "val_every": 100, "checkpoint_every": 50,
                                    "log_every": 10})
def _make_varlide_var(weights: str | None = None, **kw: Any) -> VarlideVar:
    """``weights``: a folder (see the module docstring); there is no default."""
    if weights is None:
        raise FileNotFoundError(missing_backbone_message(
            [Path("DIR") / f for f in BACKBONE_FILES.values()]))
    return VarlideVar.from_pretrained(weights, **kw)
