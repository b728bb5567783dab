"""The learned restorer (``varlide.models.restorer``): network, bands, weights, training on
pairs, and the stage inside varlide-lite. Tiny random configurations only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from varlide.demo import blur_pair, motion_blur_kernel, trajectory_kernel
from varlide.losses import create_loss
from varlide.models.base import create_enhancer
from varlide.models.restorer import (
    LearnedDeblur,
    LearnedDeblurSettings,
    Restorer,
    RestorerConfig,
    band_plan,
)
from varlide.models.varlide_lite import deblur_stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = RestorerConfig(widths=(4, 8, 8))


@pytest.fixture(scope="module")
def train_corpus_dir(tmp_path_factory) -> str:
    """Ten 96 px crops of the bundled photographs (edges to deblur), as PNG files."""
    from PIL import Image

    from varlide.demo import photos_uint8

    root = tmp_path_factory.mktemp("pairs")
    photos = photos_uint8()
    for i in range(10):
        arr = photos[i % len(photos)][1]
        y, x = (37 * i) % (arr.shape[0] - 96), (53 * i) % (arr.shape[1] - 96)
        Image.fromarray(np.ascontiguousarray(arr[y:y + 96, x:x + 96])).save(root / f"{i}.png")
    return str(root)


def _randomised(config: RestorerConfig = TINY, seed: int = 0) -> Restorer:
    torch.manual_seed(seed)
    model = Restorer(config).eval()
    torch.nn.init.normal_(model.net.out.weight, std=0.05)  # not the identity any more
    return model


def test_untrained_restorer_is_the_identity():
    x = torch.rand(2, 3, 37, 51)
    out = Restorer(TINY).restore(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)


def test_halo_covers_the_receptive_field():
    model = _randomised()
    h = TINY.halo
    x = torch.rand(1, 3, 4 * h, 24)
    y0 = model.restore(x)
    x2 = x.clone()
    x2[0, :, 2 * h, 12] += 0.5  # one pixel
    changed = (model.restore(x2) - y0).abs().amax(dim=(0, 1, 3)) > 0
    rows = changed.nonzero().flatten()
    assert rows.numel() > 0
    assert rows.min() >= h and rows.max() <= 3 * h  # nothing beyond the halo moves


@pytest.mark.parametrize("size", [(61, 45), (64, 64), (130, 33)])
def test_bands_change_nothing_but_float_noise(size):
    model = _randomised()
    x = torch.rand(2, 3, *size)
    whole = model.restore(x)
    model.set_workspace(2 * size[1] * TINY.widths[0] * 16 * 8)  # about 8-row bands
    plan = band_plan(64, 8, TINY.stride, TINY.halo)
    assert len(plan) == 8 and all(o0 % TINY.stride == 0 for _, _, o0, _ in plan)
    banded = model.restore(x)
    torch.testing.assert_close(banded, whole, atol=1e-5, rtol=0)


def test_weights_round_trip(tmp_path):
    model = _randomised()
    version = model.save_pretrained(tmp_path / "w")
    loaded = Restorer.from_pretrained(tmp_path / "w")
    assert loaded.version == version and loaded.config.widths == TINY.widths
    x = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(loaded.restore(x), model.restore(x))
    with pytest.raises(ValueError, match="varlide-lite"):
        create_enhancer("varlide-lite").save_pretrained(tmp_path / "lite")
        Restorer.from_pretrained(tmp_path / "lite")


def test_trajectory_kernels_and_pairs():
    rng = np.random.default_rng(3)
    for length in (1, 4, 9, 23):
        k = trajectory_kernel(length, rng)
        assert k.shape[0] % 2 == 1 and k.shape[0] >= length
        assert abs(float(k.sum()) - 1) < 1e-5 and (k >= 0).all()
    # a long trajectory spreads its mass; a 1 px one is (nearly) a point
    assert trajectory_kernel(1, rng).max() > 0.5 > trajectory_kernel(21, rng).max()
    clean = np.random.default_rng(0).random((48, 40, 3)).astype(np.float32)
    low, kernel = blur_pair(clean, np.random.default_rng(1), kernel_max=9, noise=False)
    assert low.shape == clean.shape and low.dtype == np.float32
    np.testing.assert_allclose(low * 255, np.round(low * 255), atol=1e-4)  # the 8-bit grid
    if kernel.shape[0] > 1:
        assert np.abs(low - clean).mean() > 0.01  # blurred
    line = motion_blur_kernel(9, 0.0)
    assert line.shape == (9, 9)


def test_restore_loss_needs_the_reference():
    loss = create_loss("restore")
    y = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="reference"):
        loss({"image": y}, y)
    total, terms = loss({"image": y, "reference": y}, y)
    assert float(total) < 1e-2 and set(terms) == {"l1"}


def test_training_on_pairs_learns_and_resumes(tmp_path, train_corpus_dir):
    from varlide.training import TrainConfig, train, train_defaults

    fields = {**train_defaults("restorer"), "model": {"widths": [8, 16]}, "crop": 32,
              "batch_size": 4, "val_crop": 48, "val_fraction": 0.4, "val_every": 40,
              "checkpoint_every": 20, "log_every": 10, "lr": 3e-3, "warmup": 5,
              "kernel_max": 7, "overfit_batches": 2}
    assert fields["loss"] == "restore"
    out = str(tmp_path / "run")
    first = train(train_corpus_dir, out, TrainConfig(enhancer="restorer", steps=20, **fields))
    result = train(train_corpus_dir, out, TrainConfig(enhancer="restorer", steps=60, **fields))
    assert first.steps == 20 and result.resumed_from == 20
    val = result.val_curves
    assert val["val/psnr_paired"][-1] > val["val/psnr_paired_input"][-1]  # beats the input
    assert result.curves["loss"][-1] < result.curves["loss"][0]
    assert result.split["val_paired"] == result.split["val"] > 0
    model = Restorer.from_pretrained(result.weights_uri)
    assert model.version == result.version


def test_deblur_option_parsing(tmp_path):
    model = _randomised()
    model.save_pretrained(tmp_path / "w")
    stage = deblur_stage({"method": "learned", "weights": str(tmp_path / "w"),
                          "min_gain": 1.1})
    assert isinstance(stage, LearnedDeblur)
    assert stage.tag() == f"deblur-learned-{model.version[:8]}-min_gain1.1"
    assert deblur_stage(True).tag() == "deblur" == deblur_stage("blind").tag()
    assert deblur_stage({"mu": 1e-3}).settings.mu == 1e-3  # no method: blind
    with pytest.raises(ValueError, match="method"):
        deblur_stage({"method": "magic"})
    with pytest.raises(ValueError, match="unknown setting"):
        deblur_stage({"method": "learned", "mu": 1e-3})


def test_learned_stage_in_varlide_lite(tmp_path):
    model = _randomised()
    model.save_pretrained(tmp_path / "w")
    weights = str(tmp_path / "w")
    lite = create_enhancer("varlide-lite",
                           deblur={"method": "learned", "weights": weights, "gate": False},
                           highlights=False)
    x = torch.rand(3, 3, 40, 56) * 0.3 + 0.35
    v = torch.tensor([0.9, 0.9, 0.9])  # all inside the skip band
    b = torch.tensor([0.5, 0.1, 0.4])  # blurred, sharp, blurred
    res = lite.enhance(x, v, b)
    assert res.route == ["deblur", "skip", "deblur"]
    assert res.deblur == ["applied", "off", "applied"]
    assert torch.isnan(res.deblur_kernel_px).all()
    torch.testing.assert_close(res.images[1], x[1])
    torch.testing.assert_close(res.images[0], model.restore(x[:1])[0])
    assert "deblur-learned-" in lite.version and "-gate0" in lite.version
    # with the gate, a change that does not sharpen is refused and the input kept
    gated = LearnedDeblur(Restorer(TINY), LearnedDeblurSettings())
    r = gated(x[:1])
    assert r.decision == ["no-gain"]
    torch.testing.assert_close(r.images, x[:1])


def test_restorer_enhancer_routes_by_blur(tmp_path):
    model = _randomised()
    model.save_pretrained(tmp_path / "w")
    enh = create_enhancer("restorer", weights=str(tmp_path / "w"), gate=False)
    x = torch.rand(2, 3, 32, 32)
    res = enh.enhance(x, torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.6]))
    assert res.route == ["skip", "deblur"] and res.deblur == ["off", "applied"]
    torch.testing.assert_close(res.images[0], x[0])
    assert not torch.allclose(res.images[1], x[1])
