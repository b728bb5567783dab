"""Degradation presets of the evaluation sets: ``all`` is the demo corpus unchanged, each other
preset isolates one part of the model, and ``meta`` / ``true_kernel`` give what was applied."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.conftest import make_rgb
from varlide.demo import Degradation, degrade, photos_uint8, random_crop
from varlide.evaluation import (
    BLUR_LENGTHS,
    DEGRADATIONS,
    paired_from_folder,
    paired_synthetic,
    plan_sets,
    sets_from_plan,
    true_kernel,
)
from varlide.evaluation.sets import _path_fraction, _quantise

SIZE = (96, 72)  # width, height: small, but room for a 21 px blur
FIELDS = [f.name for f in dataclasses.fields(Degradation)]


def _set(degradation: str, **kw):
    return paired_synthetic(seeds=(0, 3), crops_per_photo=1, size=SIZE,
                            degradation=degradation, **kw)


def _params(item) -> dict:
    return {k: item.meta[k] for k in FIELDS}


def _grad_energy(x: np.ndarray) -> float:
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def _laplacian_energy(x: np.ndarray) -> float:
    return float((ndimage.laplace(x, mode="reflect") ** 2).mean())


def test_all_is_the_demo_degradation_unchanged():
    s = _set("all")
    raw = paired_synthetic(seeds=(0, 3), crops_per_photo=1, size=SIZE, quantize=False)
    assert s.name == "synthetic" and len(s) == 10
    photos = photos_uint8()
    for item, raw_item in zip(s.items, raw.items, strict=True):
        seed, i = item.meta["seed"], item.meta["index"]
        rng = np.random.default_rng([seed, i])  # what _synthetic_pair always did
        clean_u8, crop = random_crop(photos[i % len(photos)][1], SIZE, rng)
        clean = clean_u8.astype(np.float32) / np.float32(255.0)
        low, params = degrade(clean, rng)
        x, ref = item.load()
        np.testing.assert_array_equal(x, _quantise(low))
        np.testing.assert_array_equal(ref, clean)
        np.testing.assert_array_equal(raw_item.load()[0], low)
        assert _params(item) == dataclasses.asdict(params)  # meta = what was applied
        assert {k: item.meta[k] for k in crop} == crop and item.meta["degradation"] == "all"


def _folder(tmp_path, n: int = 3):
    for i in range(n):
        Image.fromarray(make_rgb(40, 56, seed=i, scale=0.8)).save(tmp_path / f"{i}.png")
    return str(tmp_path)


def test_all_from_folder_unchanged_and_meta_without_pixels(tmp_path):
    uri = _folder(tmp_path)
    s = paired_from_folder(uri, brightness=None, seeds=(0, 2), limit=None)
    assert s.name == tmp_path.name
    for item in s.items:
        key = int(_path_fraction(item.meta["source"], 0) * 2**32)
        x, clean = item.load()
        low, params = degrade(clean, np.random.default_rng([item.meta["seed"], key]))
        np.testing.assert_array_equal(x, _quantise(low))
        assert _params(item) == dataclasses.asdict(params)
    blur = paired_from_folder(uri, brightness=None, limit=None, degradation="blur")
    assert blur.name == f"{tmp_path.name}-blur" and "motion blur" in blur.description
    for f in tmp_path.glob("*.png"):
        f.unlink()  # meta and kernel are known without the pixels
    assert all(true_kernel(item).shape[0] >= 5 for item in blur.items)


def test_dark_darkens_without_blur_or_noise():
    s = _set("dark")
    assert s.name == "synthetic-dark" and "(darkening)" in s.description
    for item in s.items:
        x, ref = item.load()
        m = item.meta
        assert m["kernel_length"] == 1 and m["noise_sigma"] == m["shot_noise"] == 0
        assert m["gamma"] > 1 and m["exposure"] < 1 and x.mean() < ref.mean()
        expected = np.float32(m["exposure"]) * np.power(ref, np.float32(m["gamma"]))
        np.testing.assert_allclose(x, _quantise(expected), atol=1 / 255 + 1e-6)


def test_blur_keeps_brightness_and_lowers_gradient_energy():
    s = _set("blur")
    assert s.name == "synthetic-blur" and "darkening" not in s.description
    for item in s.items:
        x, ref = item.load()
        assert item.meta["kernel_length"] in BLUR_LENGTHS and item.meta["gamma"] == 1.0
        assert abs(x.mean() - ref.mean()) < 0.02
        assert _grad_energy(x) < 0.8 * _grad_energy(ref)
    lengths = {item.meta["kernel_length"] for item in _set("blur").items}
    assert len(lengths) > 1 and min(lengths) >= 5  # drawn, never sharp
    fixed = _set("blur", kernel_lengths=[9])
    assert {item.meta["kernel_length"] for item in fixed.items} == {9}
    assert [i.id for i in fixed.items] == [i.id for i in s.items]  # the same crops
    np.testing.assert_array_equal(fixed.items[0].load()[1], s.items[0].load()[1])
    with pytest.raises(ValueError, match="only 'blur'"):
        _set("dark", kernel_lengths=[9])
    with pytest.raises(ValueError, match=">= 1"):
        _set("blur", kernel_lengths=[])


def test_noise_keeps_brightness_and_raises_laplacian_energy():
    s = _set("noise")
    for item in s.items:
        x, ref = item.load()
        assert item.meta["kernel_length"] == 1 and item.meta["exposure"] == 1.0
        assert abs(x.mean() - ref.mean()) < 0.02
        assert _laplacian_energy(x) > _laplacian_energy(ref)


def test_sharp_input_is_the_reference():
    s = _set("sharp")
    assert s.name == "synthetic-sharp" and "none" in s.description
    for item in s.items:
        x, ref = item.load()
        np.testing.assert_array_equal(x, ref)
        assert true_kernel(item).shape == (1, 1)


@pytest.mark.parametrize("quantize", [True, False])
def test_meta_kernel_reproduces_the_input(quantize):
    s = _set("blur", quantize=quantize)
    for item in s.items:
        x, clean = item.load()
        k = true_kernel(item)
        assert k.shape[0] >= 5 and abs(float(k.sum()) - 1) < 1e-5
        again, _ = degrade(clean, np.random.default_rng(99), **_params(item))
        np.testing.assert_array_equal(x, _quantise(again) if quantize else again)
        direct = np.clip(ndimage.convolve(clean, k[:, :, None], mode="reflect"), 0, 1)
        np.testing.assert_allclose(x, direct, atol=1 / 255 + 1e-6)
        wrong = dict(_params(item), kernel_angle=item.meta["kernel_angle"] + 90)
        off, _ = degrade(clean, np.random.default_rng(99), **wrong)
        assert np.abs(off - x).mean() > 5 * np.abs(direct - x).mean() + 1e-4


def test_unknown_preset_names_the_known_ones(tmp_path):
    known = ", ".join(DEGRADATIONS)
    assert list(DEGRADATIONS) == ["all", "dark", "blur", "noise", "sharp"]
    for make in (lambda: _set("night"),
                 lambda: paired_from_folder(_folder(tmp_path), degradation="night"),
                 lambda: plan_sets("synthetic", degradations=["all", "night"])):
        with pytest.raises(ValueError, match=f"'night'; known: {known}"):
            make()
    item = paired_synthetic(seeds=(0,), crops_per_photo=1, size=SIZE).items[0]
    with pytest.raises(ValueError, match="no blur kernel"):
        true_kernel(dataclasses.replace(item, meta={}))


def test_plan_requests_one_synthetic_set_per_preset(tmp_path):
    plan = plan_sets("synthetic", max_images=2, max_side=64, degradations="all,blur,sharp")
    sets = sets_from_plan(json.loads(json.dumps(plan)))
    assert [s.name for s in sets] == ["synthetic", "synthetic-blur", "synthetic-sharp"]
    assert all(len(s) == 2 for s in sets)
    assert [i.id for i in sets[0].items] == [i.id for i in sets[1].items]
    assert sets[1].items[0].meta["kernel_length"] in BLUR_LENGTHS
    x, ref = sets[2].items[0].load()
    np.testing.assert_array_equal(x, ref)
    old = [{k: v for k, v in plan[0].items() if k != "degradation"}]  # a plan from before
    np.testing.assert_array_equal(sets_from_plan(old)[0].items[0].load()[0],
                                  sets[0].items[0].load()[0])
    with pytest.raises(ValueError, match="a folder is not degraded"):
        plan_sets(_folder(tmp_path), degradations=["blur"])


def test_presets_on_shared_images(shared_data):
    sice = shared_data / "train-sice"
    if not sice.is_dir():
        pytest.skip(f"{sice} is absent")
    rel = sorted(p.name for p in sice.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:40]
    s = paired_from_folder(str(sice), rel, limit=2, max_side=128, degradation="blur")
    assert s.items and s.name == "train-sice-blur"
    for item in s.items:
        x, clean = item.load()
        again, _ = degrade(clean, np.random.default_rng(0), **_params(item))
        np.testing.assert_array_equal(x, _quantise(again))
        assert abs(x.mean() - clean.mean()) < 0.02 and _grad_energy(x) < _grad_energy(clean)
