"""A bad name, device or usage fails before anything starts: exit 2, ``error: ...``.

Before, an unregistered ``--enhancer``, an unknown ``--metrics`` name or prior, or ``--device
cuda`` without CUDA passed ``--dry-run`` (exit 0) and failed the real run inside every shard
task after its retries (exit 1, ~35 s); a missing or mistyped path or config escaped as a
traceback. Every case here runs, dry and real, in one fresh interpreter with no
``PREFECT_API_URL``: the exit code, the message (naming the bad value and the valid ones),
the time, and no server started (``test_cli_no_server.assert_no_server``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli_no_server import assert_no_server, corpus, run_cli_calls

# name -> (extra argv, strings the message must contain: the bad value, then valid ones)
BAD_NAMES = {
    "enhancer": (["--enhancer", "varlide-xl"],
                 ["'varlide-xl'", "classic-curve", "varlide-lite", "varlide-var", "zero-dce"]),
    "metric": (["--metrics", "brightness,sharpnes"],
               ["'sharpnes'", "brightness", "entropy", "piqe", "sharpness"]),
    "prior": (["--prior", "analytik"], ["'analytik'", "analytic", "auto", "clip"]),
    "reference-metric": (["--reference", "{ref}", "--config", "{refcfg}"],
                         ["'ssimm'", "psnr", "ssim"]),
    "device": (["--device", "cuda"], ["'cuda'", "CUDA is not available", "auto", "cpu"]),
}
# usage errors -> (argv after `enhance`, what the message must contain)
USAGE = {
    "missing-input": (["{tmp}/nope", "{out}"], ["input not found", "nope"]),
    "input-is-a-file": (["{file}", "{out}"], ["is not a folder"]),
    "output-is-a-file": (["{inp}", "{file}"], ["exists and is not a folder"]),
    "memory-budget": (["{inp}", "{out}", "--memory-budget", "lots"], ["memory_budget"]),
    "unknown-config-field": (["{inp}", "{out}", "--config", "{unknown}"], ["bogus_field"]),
    "bad-yaml": (["{inp}", "{out}", "--config", "{badyaml}"], ["not valid YAML"]),
    "config-is-a-folder": (["{inp}", "{out}", "--config", "{tmp}"], ["cannot be read"]),
    "negative-limit": (["{inp}", "{out}", "--limit", "-1"], ["limit"]),
    "pickled-weights": (["{inp}", "{out}", "--weights", "{pickled}"],
                        ["cannot be used with --enhancer varlide-lite", "is a pickle",
                         "never loads pickled"]),
    "wrong-shape-weights": (["{inp}", "{out}", "--weights", "{reshaped}"],
                            ["cannot be used with --enhancer varlide-lite", "shape"]),
    "wrong-dtype-weights": (["{inp}", "{out}", "--weights", "{retyped}"],
                            ["cannot be used with --enhancer varlide-lite", "dtype"]),
}
MODES = {"dry": ["--dry-run"], "real": []}


def _paths(root: Path) -> dict[str, str]:
    inp = corpus(root / "in", 2)
    ref = corpus(root / "ref", 2)
    (root / "refcfg.yaml").write_text("reference_metrics: [psnr, ssimm]\n")
    (root / "unknown.yaml").write_text("bogus_field: 1\n")
    (root / "bad.yaml").write_text("metrics: [brightness\n")
    (root / "a-file.txt").write_text("not a folder\n")
    weights = _bad_weights(root)
    return {**weights, "tmp": str(root), "inp": str(inp), "out": str(root / "out"), "ref": str(ref),
            "refcfg": str(root / "refcfg.yaml"), "unknown": str(root / "unknown.yaml"),
            "badyaml": str(root / "bad.yaml"), "file": str(root / "a-file.txt")}


def _bad_weights(root: Path) -> dict[str, str]:
    """Folders like the shipped varlide-lite weights: a pickle in place of the safetensors,
    and the real tensors with one shape or one dtype changed."""
    import hashlib
    import json
    import pickle

    from safetensors.torch import load_file, save_file

    shipped = Path(__file__).resolve().parents[1] / "varlide/models/shipped/varlide-lite"
    state = load_file(shipped / "model.safetensors")
    name = next(k for k, v in state.items() if v.ndim >= 2 and v.is_floating_point())
    variants = {
        "pickled": None,
        "reshaped": {**state, name: torch.zeros(state[name].shape[0] + 1,
                                                *state[name].shape[1:])},
        "retyped": {**state, name: state[name].double()},
    }
    out = {}
    for key, tensors in variants.items():
        folder = root / "weights" / key
        folder.mkdir(parents=True)
        if tensors is None:
            (folder / "model.safetensors").write_bytes(pickle.dumps({"w": [1.0]}))
        else:
            save_file(tensors, str(folder / "model.safetensors"))
        meta = json.loads((shipped / "config.json").read_text())  # its digest matches: the
        meta["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        (folder / "config.json").write_text(json.dumps(meta))  # content is what is refused
        out[key] = str(folder)
    return out


def _argv(name: str, mode: str, paths: dict[str, str]) -> list[str]:
    if name in BAD_NAMES:
        extra = BAD_NAMES[name][0]
        argv = ["{inp}", "{out}", "--enhancer", "classic-curve", "--metrics", "brightness",
                *extra]
    else:
        argv = USAGE[name][0]
    return ["enhance", *(a.format(**paths) for a in argv), "--no-progress", *MODES[mode]]


CASES = [(name, mode) for name in [*BAD_NAMES, *USAGE] for mode in MODES]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("preflight")
    paths = _paths(root)
    calls = [_argv(name, mode, paths) for name, mode in CASES]
    found = run_cli_calls(calls, root)
    out = dict(zip(CASES, found, strict=True))
    for r in out.values():
        r["out_dir_exists"] = Path(paths["out"]).exists()
    return out


def _check(result: dict, expected: list[str]) -> None:
    err = result["err"]
    assert result["rc"] == 2, f"exit {result['rc']}, expected 2:\n{err}\n{result['out']}"
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in the message: {err}"
    assert result["seconds"] < 30, f"{result['seconds']:.0f} s to refuse"
    assert_no_server(result)
    assert not result["out_dir_exists"], "something was written to OUTPUT"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_bad_name_or_device_is_refused_before_anything_starts(results, name, mode):
    if name == "device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")
    _check(results[(name, mode)], BAD_NAMES[name][1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(USAGE))
def test_usage_error_exits_2_without_a_traceback(results, name, mode):
    _check(results[(name, mode)], USAGE[name][1])
