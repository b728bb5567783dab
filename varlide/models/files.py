"""The enhancers' weight files: a folder the user names, or the shipped default weights
(``varlide/models/shipped/<name>/``). ``models:/`` URIs are resolved above, by
``varlide.resolver``; a model only ever sees a folder or a URI of our own format."""

from __future__ import annotations

from pathlib import Path

from varlide.weights.files import WeightFile, package_dir


def enhancers_with_default_weights() -> list[str]:
    """Registered enhancers that ship weights (their ``ships_weights`` metadata)."""
    import varlide.models  # noqa: F401  (registers the built-in enhancers)
    from varlide.models.base import ENHANCERS

    return ENHANCERS.names_where("ships_weights")



def published_files() -> list[tuple[str, WeightFile]]:
    """(enhancer, file) for the upstream files an enhancer is built from (its registry's
    ``release_files``: varlide-var's VARSR.pth and VQVAE.pth), for ``weights pull --all``."""
    import varlide.models  # noqa: F401  (registers the built-in enhancers)
    from varlide.models.base import ENHANCERS

    return [(name, f) for name in ENHANCERS.names_where("release_files")
            for f in ENHANCERS.info(name)["release_files"]()]


def enhancer_files(name: str, weights: str | None) -> list[WeightFile]:
    """The files a run of enhancer ``name`` with ``weights`` needs: its registry's
    ``weight_files(weights)`` when it declares one (varlide-var's backbone files), else a
    weights folder's two files, else the shipped ones."""
    import varlide.models  # noqa: F401  (registers the built-in enhancers)
    from varlide.models.base import ENHANCERS

    if name in ENHANCERS and ENHANCERS.info(name).get("weight_files") and not (
            weights or "").startswith("models:/"):
        return ENHANCERS.info(name)["weight_files"](weights)
    note = (f"made by `varlide train DATA OUT --enhancer {name}`; copy OUT/final/ to "
            f"{package_dir() / name}/ or pass --weights")
    if weights:
        if weights.startswith("models:/"):
            raise ValueError(f"{weights}: resolve it first (varlide.resolver.local_weights)")
        if "://" in weights and not weights.startswith("file://"):
            return []  # a remote folder: read by the enhancer's own loader, errors name it
        p = Path(weights.removeprefix("file://")).expanduser().resolve()
        files = [p, p.parent / "config.json"] if p.suffix == ".safetensors" else [
            p / "model.safetensors", p / "config.json"]
        return [WeightFile(f"file:{f}", None, "enhancer", note=note) for f in files]
    if name in enhancers_with_default_weights() or (package_dir() / name).is_dir():
        return [WeightFile(f"package:{name}/{f}", None, "enhancer", note=note)
                for f in ("model.safetensors", "config.json")]
    return []
