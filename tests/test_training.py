"""The library trainer: checkpoints, resume after a kill, learning, deterministic split."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_rgb
from PIL import Image

from varlide.holdout import split_corpus
from varlide.models import create_enhancer
from varlide.models.varlide_lite import default_weights_dir
from varlide.training import TrainConfig, train

TINY_MODEL = {"width": 4, "vgpm_width": 4, "hidden": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        scale = (0.15, 0.4, 0.8, 1.0)[i % 4]
        Image.fromarray(make_rgb(48, 56, seed=i, scale=scale)).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def tiny(**kw) -> TrainConfig:
    base = dict(model=TINY_MODEL, steps=6, batch_size=2, crop=32, val_crop=32,
                val_fraction=0.3, val_every=3, checkpoint_every=3, log_every=1, lr=5e-3,
                warmup=1, threads=2, prefetch=2)
    base.update(kw)
    return TrainConfig(**base)


def test_trains_checkpoints_and_final_weights(corpus, tmp_path):
    seen: list[tuple[int, str]] = []
    metrics: dict[int, dict] = {}
    r = train(str(corpus), str(tmp_path / "out"), tiny(),
              on_checkpoint=lambda s, u: seen.append((s, u)),
              on_metrics=lambda s, m: metrics.setdefault(s, {}).update(m))
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    for name in ckpts:
        files = {p.name for p in (tmp_path / "out" / "checkpoints" / name).iterdir()}
        assert files == {"model.safetensors", "config.json", "optimizer.safetensors",
                         "state.json"}
    assert [s for s, _ in seen] == [3, 6, 6] and seen[-1][1].endswith("final")
    assert r.steps == 6 and r.resumed_from is None and r.curves["step"] == list(range(1, 7))
    assert {"loss", "exp", "en", "lr", "temperature", "steps_per_s"} <= set(metrics[6])
    assert "val/loss" in metrics[3] and "val/brightness_dark" in r.val_curves
    assert r.split["train"] + r.split["val"] == 8 and r.split["val"] >= 1
    model = create_enhancer("varlide-lite", weights=r.weights_uri)
    assert model.version == r.version and model.trained_prior == "analytic"
    meta = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert meta["training"]["steps"] == 6 and meta["training"]["config"]["crop"] == 32
    # trained with the backbone slot empty, the final weights name the denoiser (as shipped)
    assert meta["model"]["backbone"] == "denoise" and r.version.endswith("+denoise-w1.5-k1+hl")
    ckpt = json.loads((tmp_path / "out" / "checkpoints" / "step-0000006" / "config.json")
                      .read_text())
    assert ckpt["model"]["backbone"] == "identity"
    # the effective loss (defaults included) travels with the weights
    loss = meta["training"]["loss"]
    assert loss["name"] == "varlide" and loss["weights"]["exp"] == 20.0
    assert loss["ed_mode"] == "local"
    # `varlide train`'s defaults reproduce the shipped weights' loss (their recorded recipe)
    shipped = json.loads((default_weights_dir("varlide-lite") / "config.json").read_text())
    assert loss == shipped["training"]["loss"]
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert curves["train"]["step"][-1] == 6


def test_killed_run_resumes_where_its_checkpoint_left_off(corpus, tmp_path):
    class Killed(Exception):
        pass

    def kill_at_5(step, m):
        if step == 5 and "loss" in m:
            raise Killed

    with pytest.raises(Killed):
        train(str(corpus), str(tmp_path / "run"), tiny(), on_metrics=kill_at_5)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-0000003"]
    resumed = train(str(corpus), str(tmp_path / "run"), tiny())
    assert resumed.resumed_from == 3 and resumed.curves["step"] == list(range(1, 7))
    # the resumed run is the run that was never killed: same batches, same Adam state
    whole = train(str(corpus), str(tmp_path / "whole"), tiny())
    a = create_enhancer("varlide-lite", weights=resumed.weights_uri).state_dict()
    b = create_enhancer("varlide-lite", weights=whole.weights_uri).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # a longer schedule continues from the last checkpoint; another recipe is refused
    longer = train(str(corpus), str(tmp_path / "run"), tiny(steps=7))
    assert longer.resumed_from == 6 and longer.curves["step"][-1] == 7
    with pytest.raises(ValueError, match="crop"):
        train(str(corpus), str(tmp_path / "run"), tiny(steps=8, crop=24))


def test_loss_goes_down_on_a_fixed_batch(corpus, tmp_path):
    cfg = tiny(steps=25, overfit_batches=1, lr=2e-2, val_fraction=0.0, checkpoint_every=25,
               temperature=(0.5, 0.5))
    r = train(str(corpus), str(tmp_path / "fit"), cfg)
    loss = r.curves["loss"]
    assert loss[-1] < 0.8 * loss[0]


def test_zero_dce_baseline_trains(corpus, tmp_path):
    cfg = tiny(enhancer="zero-dce", loss="zero-dce", model={"width": 4}, steps=2,
               checkpoint_every=2, val_every=2)
    r = train(str(corpus), str(tmp_path / "zd"), cfg)
    assert create_enhancer("zero-dce", weights=r.weights_uri).version == r.version


def test_split_is_by_content_not_name(corpus, tmp_path):
    train_a, val_a = split_corpus(str(corpus), fraction=0.3)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in corpus.glob("*.png"):
        (renamed / f"x_{p.name}").write_bytes(p.read_bytes())
    train_b, val_b = split_corpus(str(renamed), fraction=0.3)
    assert sorted(f"x_{n}" for n in val_a) == sorted(val_b) and len(train_a) == len(train_b)


def test_config_validation():
    with pytest.raises(ValueError, match="enhancer"):
        TrainConfig(enhancer="nope")
    with pytest.raises(ValueError, match="scale"):
        TrainConfig(scale=(0.0, 1.0))


def test_evaluation_holds_out_exactly_the_trainers_images(tmp_path):
    """The trainer's validation images, ``varlide eval``'s default sets and the retrain
    gate's held-out images come from one rule (varlide.holdout): the same files."""
    from varlide import holdout
    from varlide.evaluation import default_sets

    root = tmp_path / "data" / "train-sice"
    root.mkdir(parents=True)
    for i in range(24):  # well exposed and moderate, so both train-sice sets fill
        scale = (0.3, 0.5, 0.7, 0.9)[i % 4]
        Image.fromarray(make_rgb(40, 48, seed=100 + i, scale=scale)).save(root / f"s{i}.png")
    r = train(str(root), str(tmp_path / "out"), tiny(steps=1, val_fraction=0.4, val_max=6,
                                                      val_every=1, checkpoint_every=1))
    trainer_held = r.split["val_rel_paths"]
    assert 0 < len(trainer_held) <= 6
    assert holdout.split_corpus(str(root), 0.4, 6)[1] == trainer_held
    sets = default_sets(str(tmp_path / "data"), 0.4, 6, synthetic=False, pseudo_limit=None,
                        moderate_limit=None)
    used = {i.meta["source"] for s in sets if s.name.startswith("sice") for i in s.items}
    assert used and used <= set(trainer_held)
