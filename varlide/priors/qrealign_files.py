"""The files of the ``qrealign`` prior: the ``prior_model`` spec parser and the file table.

A ``prior_model`` is one of:

- empty, ``mini`` / ``lite`` / ``pro`` or a repo id of ``REPOS`` (default
  ``q-future/Q-ReAlign-Mini-0.8B``): the Hugging Face hub repo, in the hub cache (``hf:``
  locations), fetched by ``varlide weights pull/mirror/sync``;
- a local folder (``/path``, ``./path``, ``~/path`` or ``local-dir:/path``) holding what
  ``save_pretrained`` of a ``Qwen3_5ForConditionalGeneration`` and its processor write.

Nothing here imports torch or transformers: the resolver lists these files on machines that
never load the model.
"""

from __future__ import annotations

from pathlib import Path

from varlide.priors.vlm_files import ModelSpec, parse_model_spec, snapshot_folder
from varlide.priors.vlm_files import model_label as vlm_model_label
from varlide.weights.files import WeightFile, hf_file

REPOS = {"mini": "q-future/Q-ReAlign-Mini-0.8B", "lite": "q-future/Q-ReAlign-Lite-4B",
         "pro": "q-future/Q-ReAlign-Pro-9B"}
DEFAULT_MODEL = REPOS["mini"]
# What a Qwen3.5-VL checkpoint saved by transformers >= 5.2 holds (config, weights, the
# tokenizer, the image processor, the chat template). Assumption, not checked against the
# hub (unreachable here): the repos hold one model.safetensors (Mini) or a sharded one with
# its index (Lite, Pro), and a preprocessor_config.json as the Qwen3.5 base repos do.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "preprocessor_config.json")
REPO_WEIGHTS = {
    REPOS["mini"]: ("model.safetensors",),
    REPOS["lite"]: ("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"),
    REPOS["pro"]: ("model.safetensors.index.json", "model-00001-of-00004.safetensors",
                   "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
                   "model-00004-of-00004.safetensors"),
}
IMAGE_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")


QReAlignSpec = ModelSpec  # the shared spec (varlide.priors.vlm_files)


def parse_qrealign_model(spec: str | None) -> QReAlignSpec:
    """``prior_model`` -> spec (see the module docstring; ``mini`` / ``lite`` / ``pro`` name
    the three repos); an unknown repo id is an error naming the known ones."""
    spec = REPOS.get(spec.strip(), spec) if spec else spec
    return parse_model_spec(
        spec, DEFAULT_MODEL, REPO_WEIGHTS,
        f"the qrealign prior knows the files of {', '.join(sorted(REPO_WEIGHTS))} (or mini / "
        "lite / pro); any other Q-ReAlign checkpoint is named by a local folder")


def folder_paths(folder: Path) -> list[Path]:
    """Every file a local model folder must hold: config, weights, tokenizer, processor."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        weights = [index] + [folder / s for s in shards]
    else:
        weights = [folder / "model.safetensors"]
    processor = next((folder / n for n in IMAGE_PROCESSOR_CONFIGS if (folder / n).is_file()),
                     folder / IMAGE_PROCESSOR_CONFIGS[0])
    return [folder / "config.json", *weights, folder / "tokenizer.json",
            folder / "tokenizer_config.json", processor]


def qrealign_files(spec: QReAlignSpec) -> list[WeightFile]:
    """The files of a spec, as ``varlide.weights`` records (hub: mirrorable ``hf:``)."""
    if spec.kind == "folder":
        return [WeightFile(f"file:{p}", None, "file", note="a qrealign prior_model folder")
                for p in folder_paths(Path(spec.path))]
    names = ("config.json", *REPO_WEIGHTS[spec.path], *PROCESSOR_FILES)
    return [hf_file(spec.path, n, "qrealign") for n in names]


def model_folder(spec: QReAlignSpec) -> Path:
    """Where the files of ``spec`` lie (a hub repo: its one snapshot folder)."""
    if spec.kind == "folder":
        return Path(spec.path)
    return snapshot_folder(qrealign_files(spec), spec.path)


def model_label(spec: QReAlignSpec) -> str:
    """The ``prior_model`` a row records (``varlide.priors.vlm_files.model_label``)."""
    return vlm_model_label(spec, folder_paths)


def prior_files(model: str | None) -> tuple[str, list[WeightFile]]:
    """(label, files) a ``prior_model`` needs: the registry's ``files`` metadata; the label
    is the one the loaded prior records (``model_label``)."""
    spec = parse_qrealign_model(model)
    return model_label(spec), qrealign_files(spec)
