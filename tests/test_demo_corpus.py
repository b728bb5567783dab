"""varlide.demo: the degradation model and the seeded low-light/reference demo corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_rgb

from varlide.demo import (
    Degradation,
    degrade,
    make_demo_corpus,
    motion_blur_kernel,
    source_photographs,
)
from varlide.imaging.decode import decode_image


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    names = make_demo_corpus(str(out), count=6, size=(64, 48), seed=7)
    return out, names


def test_corpus_files_counts_and_sizes(corpus):
    out, names = corpus
    assert len(names) == 6 and len(set(names)) == 6
    assert names[0] == "0000_astronaut.png"
    assert _files(out) == sorted(
        ["degradations.json"] + [f"lowlight/{n}" for n in names] + [f"reference/{n}" for n in names]
    )
    meta = json.loads((out / "degradations.json").read_text())
    assert meta["seed"] == 7 and meta["count"] == 6 and sorted(meta["images"]) == sorted(names)
    fields = set(Degradation.__dataclass_fields__)
    for i, name in enumerate(names):
        rec = meta["images"][name]
        assert fields <= set(rec) and 1 <= rec["kernel_length"] <= 15
        assert 0.05 <= rec["exposure"] <= 0.3 and 1.0 <= rec["gamma"] <= 2.0
        low = decode_image((out / "lowlight" / name).read_bytes())
        ref = decode_image((out / "reference" / name).read_bytes())
        expected = (256, 256) if i % 5 == 4 else (64, 48)  # every 5th: the second size
        assert (low.width, low.height) == (ref.width, ref.height) == expected
        assert rec["crop_xywh"][2:] == list(expected)
        # the degraded image is much darker than its clean reference
        assert low.pixels.mean() < 0.5 * ref.pixels.mean()


def test_same_seed_same_bytes_different_seed_differs(corpus, tmp_path):
    out, names = corpus
    again = make_demo_corpus(str(tmp_path / "a"), count=6, size=(64, 48), seed=7)
    assert again == names
    for rel in _files(out):
        assert (tmp_path / "a" / rel).read_bytes() == (out / rel).read_bytes(), rel
    make_demo_corpus(str(tmp_path / "b"), count=2, size=(64, 48), seed=8)
    first = f"lowlight/{names[0]}"
    assert (tmp_path / "b" / first).read_bytes() != (out / first).read_bytes()


def test_corpus_through_fsspec_memory():
    names = make_demo_corpus("memory://varlide-demo-test", count=1, size=(32, 24), seed=1)
    import fsspec

    fs = fsspec.filesystem("memory")
    data = fs.cat_file(f"/varlide-demo-test/lowlight/{names[0]}")
    assert decode_image(data).width == 32
    assert fs.exists("/varlide-demo-test/degradations.json")
    fs.rm("/varlide-demo-test", recursive=True)


def test_source_photographs_offline():
    photos = source_photographs()
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(photos)
    for arr in photos.values():
        assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[2] == 3
        assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.std() > 0.05


@pytest.mark.parametrize("length,angle", [(1, 0.0), (2, 10.0), (7, 0.0), (9, 33.0), (15, 90.0)])
def test_motion_blur_kernel(length, angle):
    k = motion_blur_kernel(length, angle)
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert abs(float(k.sum()) - 1.0) < 1e-6 and k.min() >= 0
    c = k.shape[0] // 2
    if length == 1:
        assert k.shape == (1, 1)
    if angle == 0.0 and length == 7:  # horizontal line through the centre row
        np.testing.assert_allclose(k[c], 1 / 7, atol=0.02)
        assert k.sum(axis=1)[c] == pytest.approx(1.0)
    if angle == 90.0:  # vertical
        assert k[:, c].sum() == pytest.approx(1.0, abs=1e-5)


def test_degrade_identity_and_darkening():
    clean = make_rgb(24, 32, seed=2).astype(np.float32) / 255
    rng = np.random.default_rng(0)
    same, params = degrade(
        clean, rng, gamma=1.0, exposure=1.0, kernel_length=1, noise_sigma=0.0, shot_noise=0.0
    )
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, clean)
    assert (params.gamma, params.exposure, params.kernel_length) == (1.0, 1.0, 1)

    low, params = degrade(clean, np.random.default_rng(5))
    assert low.shape == clean.shape and 0 <= low.min() and low.max() <= 1
    assert low.mean() < 0.5 * clean.mean()
    again, params2 = degrade(clean, np.random.default_rng(5))
    assert params2 == params and np.array_equal(again, low)

    blurred, _ = degrade(
        clean, rng, gamma=1.0, exposure=1.0, kernel_length=9, noise_sigma=0.0, shot_noise=0.0
    )
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(clean, axis=1)).mean()
    assert blurred.mean() == pytest.approx(clean.mean(), abs=0.01)  # blur keeps energy
    with pytest.raises(TypeError, match="unknown"):
        degrade(clean, rng, brightness=2.0)
