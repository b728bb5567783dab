"""Fine-tuning ``varlide-var``: VICM, VGPM and SF-RoPE around a frozen VAR backbone (tiny
random backbones written by the tests; no VAR weights exist here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_rgb
from PIL import Image
from safetensors.torch import load_file

from varlide.losses import create_loss
from varlide.models.base import create_enhancer
from varlide.models.pretrained import WEIGHTS_FILE, weights_sha256
from varlide.models.var.varsr import restore_straight_through
from varlide.models.varlide_var import (
    BACKBONE_FILES,
    TRAINABLE_PREFIXES,
    VarlideVar,
    VarlideVarConfig,
)
from varlide.training import TrainConfig, train

PATCH_NUMS = (1, 2, 4)
TINY = dict(
    transformer=dict(depth=1, width=32, heads=2, vocab_size=32, cvae=8, patch_nums=PATCH_NUMS,
                     prefix_side=4, cond_channels=(8, 16, 16), refiner_width=16,
                     refiner_depth=1),
    tokenizer=dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2),
                   patch_nums=PATCH_NUMS),
    overlap=2, tile_batch=8, refine=False)
TILE = 16
FINE_TUNE = {"rope": "sf", "vgpm": True}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def backbone(tmp_path):
    """A folder holding a random tiny backbone (and config.json), as `weights convert` +
    a config would leave it."""
    torch.manual_seed(0)
    model = VarlideVar(VarlideVarConfig(**TINY))
    with torch.no_grad():
        for p in [*model.var.parameters(), *model.vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "backbone"
    model.save_pretrained(folder, backbone=True)
    (folder / WEIGHTS_FILE).unlink()  # the front end: the shipped varlide-lite curve
    return folder


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        scale = (0.15, 0.4, 1.0)[i % 3]
        Image.fromarray(make_rgb(24, 28, seed=i, scale=scale)).save(root / f"img{i}.png")
    return root


def _config(backbone, **kw) -> TrainConfig:
    base = dict(enhancer="varlide-var", init_from=str(backbone), model=FINE_TUNE, steps=4,
                batch_size=2, crop=TILE, val_crop=TILE, val_fraction=0.2, val_every=2,
                checkpoint_every=2, log_every=1, lr=1e-2, warmup=1, threads=1, prefetch=1,
                device="cpu", amp=False)
    return TrainConfig(**{**base, **kw})


def test_straight_through_forward_is_greedy_inference_and_gradients_reach_exactly_the_trainable(
        backbone):
    model = VarlideVar.for_training(FINE_TUNE, str(backbone)).train()
    x = torch.rand(2, 3, TILE, TILE) * 0.3
    v, b = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.6])
    enh = VarlideVar.from_pretrained(backbone, highlights=False, skip_visibility=None)
    with torch.no_grad():  # the forward value is what inference gives (greedy, no refiner)
        hard = model(x, v, b, mask="hard")
        curve = enh.vicm(x, v, mask="hard")["image"].clamp(0, 1)
        res = enh.enhance(x, v, b)
    torch.testing.assert_close(hard["curve_image"].clamp(0, 1), curve)
    assert model.vgpm is not None and enh.vgpm is None
    torch.testing.assert_close(restore_straight_through(enh.var, enh.vae, curve),
                               res.images, atol=1e-6, rtol=0)

    loss, _ = create_loss("varlide")(model(x, v, b, mask="soft", temperature=0.5), x, v, b)
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(TRAINABLE_PREFIXES)
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for part in ("vicm.", "vgpm.", "var.rope.sfrope_lambda_raw"):
        assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith(part)), part
    # at lambda = 0 the phase projection changes nothing; once lambda moves it learns too
    assert float(grads["var.rope.sfrope_phase.weight"].abs().sum()) == 0
    model.zero_grad()
    model.var.rope.set_lambda(0.3)
    create_loss("varlide")(model(x, v, b), x, v, b)[0].backward()
    assert float(model.var.rope.sfrope_phase.weight.grad.abs().sum()) > 0


def test_training_needs_the_backbone_folder(backbone, corpus, tmp_path):
    with pytest.raises(ValueError, match="--init-from DIR"):
        train(str(corpus), str(tmp_path / "out"), _config(None, init_from=None))
    with pytest.raises(FileNotFoundError, match="varsr.safetensors"):
        train(str(corpus), str(tmp_path / "out"), _config(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="exactly one backbone tile"):
        train(str(corpus), str(tmp_path / "out"), _config(backbone, crop=20, val_crop=20))


def test_checkpoints_hold_only_trainable_tensors_and_a_resumed_run_continues(
        backbone, corpus, tmp_path):
    var_sha = weights_sha256((backbone / BACKBONE_FILES["var"]).read_bytes())

    class Killed(Exception):
        pass

    def kill_at_3(step, metrics):
        if step == 3 and "loss" in metrics:
            raise Killed

    with pytest.raises(Killed):
        train(str(corpus), str(tmp_path / "run"), _config(backbone), on_metrics=kill_at_3)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert {p.name for p in ckpt.iterdir()} == {WEIGHTS_FILE, "config.json",
                                                "optimizer.safetensors", "state.json"}
    tensors = load_file(ckpt / WEIGHTS_FILE)
    assert tensors and all(k.startswith(TRAINABLE_PREFIXES) for k in tensors)
    assert "var.rope.sfrope_lambda_raw" in tensors and any(k.startswith("vgpm.") for k in tensors)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["backbone"]["varsr.safetensors"] == var_sha
    assert meta["backbone"]["dir"] == str(backbone)

    resumed = train(str(corpus), str(tmp_path / "run"), _config(backbone))
    train(str(corpus), str(tmp_path / "whole"), _config(backbone))
    assert resumed.resumed_from == 2 and resumed.curves["step"] == [1, 2, 3, 4]
    a, b = (load_file(tmp_path / d / "final" / WEIGHTS_FILE) for d in ("run", "whole"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    lam = float(torch.tanh(a["var.rope.sfrope_lambda_raw"]))
    assert lam != 0.0  # SF-RoPE was switched on by training
    start = VarlideVar.for_training(FINE_TUNE, str(backbone)).front_state()
    assert start.keys() == a.keys()
    moved = [k for k in a if not torch.equal(start[k], a[k])]
    assert any(k.startswith("vicm.") for k in moved) and any(k.startswith("vgpm.") for k in moved)

    # the final weights run as an enhancer, the backbone found where training left it
    enh = create_enhancer("varlide-var", weights=resumed.weights_uri)
    assert enh.version == resumed.version and f"+var{var_sha[:8]}+" in enh.version
    out = enh.enhance(torch.rand(1, 3, 20, 24) * 0.2, torch.tensor([0.1]), torch.tensor([0.5]))
    assert out.route == ["full"] and torch.isfinite(out.images).all()


def test_another_backbone_is_refused(backbone, corpus, tmp_path):
    r = train(str(corpus), str(tmp_path / "run"), _config(backbone, steps=1, val_fraction=0))
    other = tmp_path / "other"
    VarlideVar(VarlideVarConfig(**TINY)).save_pretrained(other, backbone=True)
    with pytest.raises(ValueError, match="not the backbone these weights were trained with"):
        create_enhancer("varlide-var", weights=r.weights_uri, backbone=str(other))
    for f in BACKBONE_FILES.values():
        (backbone / f).unlink()
    with pytest.raises(FileNotFoundError, match="where the weights' config.json says"):
        create_enhancer("varlide-var", weights=r.weights_uri)


@pytest.mark.usefixtures("prefect_harness")
def test_varlide_train_cli_runs_the_train_flow(backbone, corpus, tmp_path, mlflow_sqlite):
    import yaml

    from varlide.cli import main

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": FINE_TUNE, "val_crop": TILE, "val_fraction": 0,
                                   "threads": 1, "amp": False, "log_every": 1}))
    code = main(["train", str(corpus), str(tmp_path / "out"), "--enhancer", "varlide-var",
                 "--init-from", str(backbone), "--steps", "2", "--crop", str(TILE),
                 "--batch-size", "2", "--device", "cpu", "--config", str(cfg)])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert meta["enhancer"] == "varlide-var" and meta["training"]["steps"] == 2
    assert meta["training"]["config"]["lr"] == 1e-4  # the registry's train_defaults
    assert not (tmp_path / "out" / "final" / BACKBONE_FILES["var"]).exists()
    assert np.isfinite(json.loads((tmp_path / "out" / "curves.json").read_text())
                       ["train"]["loss"]).all()
