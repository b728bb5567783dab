"""The authors' checkpoint files: reading them without a pickle, converting them to slim
safetensors (``varlide weights convert``), and the release table."""

from __future__ import annotations

import pytest
import torch

from varlide.cli import main
from varlide.models.var import MultiScaleVQVAE
from varlide.models.var.checkpoints import convert, read_authors_state
from varlide.models.var.files import HUB_REPO, RELEASED, released_weight_files

TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))


def _tiny(seed: int = 0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _authors_file(tmp_path, model) -> str:
    """A training checkpoint as the authors save it: the model beside optimizer state."""
    path = tmp_path / "VQVAE.pth"
    state = {"trainer": {"vae_local": model.state_dict(),
                         "vae_opt": {"state": {0: {"exp_avg": torch.zeros(3)}}}},
             "args": {"lr": 1e-4}}
    torch.save(state, path)
    return str(path)


def _codes(model, x):
    with torch.no_grad():
        return model.encode_indices(x)


def test_convert_keeps_the_model_and_drops_the_rest(tmp_path):
    model = _tiny()
    src = _authors_file(tmp_path, model)
    key, state = read_authors_state(src)
    assert key == "vae_local" and set(state) == set(model.state_dict())
    summary = convert(src, tmp_path / "vqvae.safetensors")
    assert summary["key"] == "vae_local" and summary["tensors"] == len(model.state_dict())
    fresh = MultiScaleVQVAE(**TINY)
    _, loaded = read_authors_state(tmp_path / "vqvae.safetensors")
    fresh.load_state_dict(loaded, strict=True)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    for a, b in zip(_codes(fresh, x), _codes(model, x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fresh.decode(fresh.indices_to_fhat(_codes(fresh, x))),
                       model.decode(model.indices_to_fhat(_codes(model, x))))


def test_fp16_conversion_halves_floats_and_keeps_integer_buffers(tmp_path):
    model = _tiny()
    src = _authors_file(tmp_path, model)
    convert(src, tmp_path / "a.safetensors")
    convert(src, tmp_path / "h.safetensors", dtype="fp16")
    _, full = read_authors_state(tmp_path / "a.safetensors")
    _, half = read_authors_state(tmp_path / "h.safetensors")
    for k, v in full.items():
        assert half[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (
        tmp_path / "a.safetensors").stat().st_size


def test_bad_files_get_clear_errors(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"no \['trainer'\]"):
        read_authors_state(tmp_path / "other.pth")
    torch.save({"trainer": {"var_opt": {}}}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="name the model with key="):
        read_authors_state(tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="dtype"):
        convert(tmp_path / "opt.pth", tmp_path / "x.safetensors", dtype="int8")


def test_cli_convert(tmp_path, capsys):
    src = _authors_file(tmp_path, _tiny())
    dst = tmp_path / "out" / "vqvae.safetensors"
    assert main(["weights", "convert", src, str(dst), "--dtype", "bf16"]) == 0
    assert "vae_local" in capsys.readouterr().out and dst.is_file()
    assert main(["weights", "convert", src]) == 2  # no DST: a usage error, nothing written


def test_release_table_names_the_published_files():
    names = {f.name for f in RELEASED.values()}
    assert names == {"VARSR.pth", "VQVAE.pth"}
    files = released_weight_files()
    assert {f.location for f in files} == {f"hf:{HUB_REPO}/{n}" for n in names}
    assert all("varlide weights convert" in f.note for f in files)
