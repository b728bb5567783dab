"""The files of the ``qinstruct`` prior: the ``prior_model`` spec parser and the file table.

A ``prior_model`` is one of:

- empty / ``teowu/llava_v1.5_7b_qinstruct_preview_v0.1`` (the default, the model of
  GPP-LLIE's eval scripts): the Q-Instruct LLaVA-1.5 7B repo in the ORIGINAL LLaVA layout
  plus its vision tower ``openai/clip-vit-large-patch14-336``, both in the Hugging Face hub
  cache (``hf:`` locations), fetched by ``varlide weights pull/mirror/sync``;
- a local folder, ``/path/to/folder`` or ``local-dir:/path/to/folder``: either the original
  LLaVA layout (``config.json`` with ``mm_vision_tower``, tokenizer files, the weights, and
  the CLIP tower in a ``vision_tower/`` subfolder) or a transformers
  ``LlavaForConditionalGeneration`` folder (``config.json`` with ``text_config``, tokenizer,
  weights).

Weights are read from ``*.safetensors`` or ``*.bin`` files, sharded through their
``*.index.json`` or not. Nothing here imports torch or transformers: the resolver lists
these files on machines that never load the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from varlide.priors.vlm_files import ModelSpec, parse_model_spec, snapshot_folder
from varlide.priors.vlm_files import model_label as vlm_model_label
from varlide.weights.files import WeightFile, hf_file

DEFAULT_QINSTRUCT_MODEL = "teowu/llava_v1.5_7b_qinstruct_preview_v0.1"
CLIP_L336 = "openai/clip-vit-large-patch14-336"  # the config's mm_vision_tower
VISION_SUBFOLDER = "vision_tower"

# The repo's files (its "Files and versions" history, Oct 2023: uploads of config.json,
# tokenizer.model, tokenizer_config.json, special_tokens_map.json, pytorch_model.bin.index.json
# and two shards, besides generation_config.json, trainer_state.json and training_args.bin,
# which scoring does not need). No tokenizer.json: transformers builds the fast tokenizer
# from tokenizer.model (sentencepiece).
QINSTRUCT_7B_FILES = (
    "config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
)
# CLIP-L/336 as LLaVA loads it (CLIPVisionModel.from_pretrained): the CLIPConfig and the
# full CLIPModel weights (the text tower's keys are dropped on conversion). Assumption:
# the repo's PyTorch file is pytorch_model.bin (the name transformers' CLIP repos of 2022
# carry); a local tower folder may hold model.safetensors instead.
CLIP_L336_FILES = ("config.json", "pytorch_model.bin")

KNOWN_REPOS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    DEFAULT_QINSTRUCT_MODEL: (QINSTRUCT_7B_FILES, CLIP_L336, CLIP_L336_FILES),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")


QinstructSpec = ModelSpec  # the shared spec (varlide.priors.vlm_files)


def parse_qinstruct_model(spec: str | None) -> QinstructSpec:
    """``prior_model`` -> spec; a path (absolute, ``./``, ``~``, an existing folder or
    ``local-dir:``) is a folder, else a repo id of ``KNOWN_REPOS``."""
    return parse_model_spec(
        spec, DEFAULT_QINSTRUCT_MODEL, KNOWN_REPOS,
        f"the qinstruct prior knows the files of {', '.join(sorted(KNOWN_REPOS))}; any other "
        "LLaVA-1.5 model is named by a local folder (original layout + vision_tower/, or a "
        "transformers Llava folder)")


# --------------------------------------------------------------------------- folders


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def folder_layout(folder: Path) -> str:
    """'transformers' when config.json is a transformers LlavaConfig (it has
    ``text_config``), else 'original' (also when config.json is not there yet)."""
    path = Path(folder) / "config.json"
    cfg = read_json(path) if path.is_file() else {}
    return "transformers" if "text_config" in cfg and "mm_vision_tower" not in cfg \
        else "original"


def weight_paths(folder: Path) -> list[Path]:
    """The weight files of a folder: an index and its shards, or the single file; when none
    is there, the index a LLaVA checkpoint ships (so a missing-files error names it)."""
    folder = Path(folder)
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [index] + [folder / s for s in shards]
    for name in WEIGHT_SINGLES:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return found or [folder / "pytorch_model.bin.index.json"]


def tokenizer_paths(folder: Path) -> list[Path]:
    folder = Path(folder)
    vocab = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    return [folder / "tokenizer_config.json"] + (vocab or [folder / "tokenizer.model"])


def folder_paths(folder: Path) -> list[Path]:
    """Every file a local model folder must hold (see the module docstring)."""
    folder = Path(folder)
    paths = [folder / "config.json", *tokenizer_paths(folder), *weight_paths(folder)]
    if folder_layout(folder) == "original":
        tower = folder / VISION_SUBFOLDER
        paths += [tower / "config.json", *weight_paths_tower(tower)]
    return paths


def weight_paths_tower(tower: Path) -> list[Path]:
    """The tower's weights; when absent, the file name the CLIP-L/336 repo ships."""
    found = weight_paths(tower)
    if len(found) == 1 and not found[0].is_file():
        return [tower / CLIP_L336_FILES[1]]
    return found


# --------------------------------------------------------------------------- the table


def qinstruct_files(spec: QinstructSpec) -> list[WeightFile]:
    """The files of a spec, as ``varlide.weights`` records (hub: mirrorable ``hf:``)."""
    if spec.kind == "folder":
        return [WeightFile(f"file:{p}", None, "file", note="a qinstruct prior_model folder")
                for p in folder_paths(Path(spec.path))]
    files, tower, tower_files = KNOWN_REPOS[spec.path]
    return [hf_file(spec.path, f, "qinstruct") for f in files] + \
        [hf_file(tower, f, "qinstruct") for f in tower_files]


def model_folders(spec: QinstructSpec) -> tuple[Path, Path | None]:
    """(model folder, vision tower folder or None) where the files of ``spec`` lie (for a
    hub spec: the snapshot folders of its two repos; each repo's files in one snapshot)."""
    if spec.kind == "folder":
        folder = Path(spec.path)
        tower = folder / VISION_SUBFOLDER if folder_layout(folder) == "original" else None
        return folder, tower
    files = qinstruct_files(spec)
    return (snapshot_folder(files, spec.path),
            snapshot_folder(files, KNOWN_REPOS[spec.path][1]))


def model_label(spec: QinstructSpec) -> str:
    """The ``prior_model`` a row records (``varlide.priors.vlm_files.model_label``)."""
    return vlm_model_label(spec, folder_paths)


def prior_files(model: str | None) -> tuple[str, list[WeightFile]]:
    """(label, files) a ``prior_model`` needs: the registry's ``files`` metadata; the label
    is the one the loaded prior records (``model_label``)."""
    spec = parse_qinstruct_model(model)
    return model_label(spec), qinstruct_files(spec)
