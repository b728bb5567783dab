"""varlide.weights: the registry, the lock file, pull / mirror / sync / verify, offline.

The round trip runs the real CLI against a local "hub" folder and the loopback S3 server:
pull -> mirror to S3 -> sync into empty caches -> verify -> corrupt one byte -> verify fails
naming the file. Files stand in for real weights (same names, any bytes): what is tested is
where they go and that their checksums hold.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_clip_prior import TINY, make_tiny_hub

from varlide import resolver, weights
from varlide.cli import main
from varlide.config import Config
from varlide.iqa import files as iqa_files

# classic-curve: the round trip is about downloaded files; the default enhancer's weights
# ship inside the package (covered by test_requirements_name_every_file)
SELECT = ["--prior", "clip", "--prior-model", TINY, "--metrics", "niqe,maniqa",
          "--reference-metrics", "lpips", "--enhancer", "classic-curve"]


def _caches(monkeypatch, root):
    """Point every cache (varlide, torch hub, HF hub) at ``root``."""
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(root / "varlide"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))


def _hub(tmp_path):
    """A local hub: the tiny CLIP checkpoint plus stand-ins for the metrics' files."""
    hub = tmp_path / "hub"
    make_tiny_hub(hub)
    cfg = Config(metrics=("niqe", "maniqa"), reference_metrics=("lpips",))
    for r in resolver.requirements(cfg, include_reference=True, with_calibration=False):
        if r.file.key and not r.file.key.startswith("package/"):
            path = hub / r.file.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"stand-in for {r.file.key}\n".encode() * 50)
    return hub


def test_requirements_name_every_file():
    cfg = Config(prior="clip", metrics=("piqe", "niqe", "musiq", "maniqa", "clipiqa", "brisque"),
                 reference_metrics=("lpips",), reference="/ref", enhancer="varlide-lite")
    by = {r.used_by.split(",")[0]: r for r in resolver.requirements(cfg, with_calibration=False)}
    assert by["prior clip ViT-B-32:openai"].file.location.startswith(
        "hf:timm/vit_base_patch32_clip_224.openai/")
    assert by["metric niqe"].file.location == "torch-hub:pyiqa/niqe_modelparameters.mat"
    assert by["metric clipiqa"].file.location == "torch-hub:clip/RN50.pt"
    assert by["metric clipiqa"].file.sha256.startswith("afeb0e10")  # pinned by its URL
    assert any(r.file.location.startswith("hf:timm/vit_base_patch8_224")
               for r in resolver.requirements(cfg, with_calibration=False))
    lpips = {r.file.location for r in resolver.requirements(cfg, with_calibration=False)
             if r.used_by == "metric lpips"}
    assert lpips == {"torch-hub:pyiqa/LPIPS_v0.1_alex-df73285e.pth",
                     "torch-hub:checkpoints/alexnet-owt-7be5be79.pth"}
    assert {r.file.location for r in resolver.requirements(cfg, with_calibration=False)
            if r.used_by == "enhancer varlide-lite"} == {
        "package:varlide-lite/model.safetensors", "package:varlide-lite/config.json"}
    assert "metric piqe" not in by  # weight-free
    none = Config(metrics=("brightness", "piqe"), enhance=False)
    assert resolver.requirements(none) == []


def test_pyiqa_table_matches_pyiqa_source():
    """Every catalogued file name appears in pyiqa's own source (read, not imported)."""
    import importlib.util
    from pathlib import Path

    root = Path(next(iter(importlib.util.find_spec("pyiqa").submodule_search_locations)))
    text = "\n".join(p.read_text(errors="ignore") for p in (root / "archs").glob("*.py"))
    for name, files in iqa_files.PYIQA_FILES.items():
        for f in files:
            base = f.location.rsplit("/", 1)[-1]
            if f.kind in ("pyiqa",):
                assert base in text, f"{name}: {base} not in pyiqa's source"


def test_round_trip_pull_mirror_sync_verify(tmp_path, monkeypatch, s3_bucket, capsys):
    hub = _hub(tmp_path)
    _caches(monkeypatch, tmp_path / "a")
    assert main(["weights", "list", *SELECT]) == 0
    out = capsys.readouterr().out
    assert out.count("MISSING") == 6  # tiny clip, niqe, maniqa x2, lpips x2

    assert main(["weights", "pull", "--hub", str(hub), *SELECT]) == 0, capsys.readouterr()
    lock = weights.read_lock()
    assert len(lock["files"]) == 6
    niqe = weights.location_path("torch-hub:pyiqa/niqe_modelparameters.mat")
    assert niqe == tmp_path / "a" / "torch" / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    assert niqe.is_file()
    entry = lock["files"]["torch-hub/pyiqa/niqe_modelparameters.mat"]
    assert entry["size"] == niqe.stat().st_size and len(entry["sha256"]) == 64
    capsys.readouterr()

    mirror = f"{s3_bucket}/weights"
    assert main(["weights", "mirror", mirror, *SELECT]) == 0, capsys.readouterr()
    remote = weights.read_remote_lock(mirror)
    assert remote["files"] == lock["files"]

    _caches(monkeypatch, tmp_path / "b")  # a fresh worker: empty caches
    assert main(["weights", "list", *SELECT]) == 0
    assert capsys.readouterr().out.count("MISSING") == 6
    assert main(["weights", "sync", mirror]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.count("synced") == 6
    assert main(["weights", "list", *SELECT]) == 0
    assert "MISSING" not in capsys.readouterr().out
    # the HF-located file is where the hub (offline) looks for it
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k",
                                   "model.safetensors", cache_dir=str(tmp_path / "b" / "hf"))
    assert isinstance(found, str) and os.path.isfile(found)
    assert main(["weights", "sync", mirror]) == 0  # again: nothing to copy
    assert "synced" not in capsys.readouterr().out

    assert main(["weights", "verify"]) == 0
    assert capsys.readouterr().out.count("ok ") >= 6
    target = tmp_path / "b" / "torch" / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01  # corrupt one byte, same size
    target.write_bytes(bytes(data))
    assert main(["weights", "verify"]) == 1
    err = capsys.readouterr()
    assert str(target) in err.err and "sha256" in err.err
    assert "FAILED" in err.out and "niqe_modelparameters.mat" in err.out


def test_sync_refuses_a_corrupt_mirror_file(tmp_path, monkeypatch):
    hub = _hub(tmp_path)
    _caches(monkeypatch, tmp_path / "a")
    reqs = resolver.requirements(Config(metrics=("niqe",), enhance=False))
    weights.pull(reqs, hub=str(hub), progress=False)
    mirror = tmp_path / "mirror"
    weights.mirror(str(mirror))
    (mirror / "torch-hub" / "pyiqa" / "niqe_modelparameters.mat").write_bytes(b"tampered")
    _caches(monkeypatch, tmp_path / "b")
    with pytest.raises(weights.WeightsError, match="niqe_modelparameters.mat"):
        weights.sync(str(mirror))
    assert not (tmp_path / "b" / "torch" / "hub" / "pyiqa" / "niqe_modelparameters.mat").exists()
    assert not list((tmp_path / "b" / "torch" / "hub" / "pyiqa").glob(".*part*"))


def test_missing_weights_fail_before_the_run_and_name_the_fetch(tmp_path, monkeypatch):
    hub = _hub(tmp_path)
    _caches(monkeypatch, tmp_path / "a")
    cfg = Config(metrics=("brightness", "niqe"), enhance=False)
    with pytest.raises(weights.WeightsMissingError) as err:
        resolver.preflight(cfg)
    msg = str(err.value)
    assert "metric niqe" in msg and str(tmp_path / "a" / "torch" / "hub" / "pyiqa") in msg
    assert "varlide weights pull" in msg and "varlide weights sync URI" in msg
    # a mirror that holds it is enough for the CLI (workers sync it at start-up)
    weights.pull(resolver.requirements(cfg), hub=str(hub), progress=False)
    weights.mirror(str(tmp_path / "mirror"))
    _caches(monkeypatch, tmp_path / "b")
    with pytest.raises(weights.WeightsMissingError):
        resolver.preflight(cfg)
    resolver.preflight(cfg.model_copy(update={"weights_mirror": str(tmp_path / "mirror")}))
    # ... and a worker fills its cache from it before building anything
    resolver.prepare_worker(cfg.model_copy(update={"weights_mirror": str(tmp_path / "mirror")}))
    assert (tmp_path / "b" / "torch" / "hub" / "pyiqa" / "niqe_modelparameters.mat").is_file()


def test_offline_switches_and_blocked_downloads(monkeypatch):
    for k in weights.OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    cfg = Config(metrics=("brightness",), enhance=False)
    resolver.prepare_worker(cfg)
    assert all(os.environ[k] == "1" for k in weights.OFFLINE_ENV)
    assert not weights.is_online()
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    original = torch.hub.download_url_to_file
    with weights.blocked_downloads("metric x"), pytest.raises(weights.WeightsMissingError,
                                                               match="metric x tried"):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", "/tmp/w.pth")
    assert torch.hub.download_url_to_file is original
    resolver.prepare_worker(cfg.model_copy(update={"weights_online": True}))
    assert weights.is_online()
    weights.set_offline(True)


def test_lock_file_format(tmp_path, monkeypatch):
    _caches(monkeypatch, tmp_path)
    f = tmp_path / "varlide" / "calibrations" / "x.json"
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    wf = weights.WeightFile("cache:calibrations/x.json", None, "calibration")
    lock = weights.record([wf])
    assert lock["format"] == weights.LOCK_FORMAT
    assert json.loads(weights.lock_path().read_text())["files"]["cache/calibrations/x.json"][
        "size"] == 2
    assert any(r.file.location == wf.location for r in resolver.catalogue())
