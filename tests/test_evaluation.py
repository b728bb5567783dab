"""varlide.evaluation: sets, the held-out split, measures against direct computation, table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_rgb
from varlide.evaluation import (
    BANDS,
    TARGET_BAND,
    EvalSet,
    SeparableSSIM,
    brightness_band,
    evaluate,
    format_table,
    measure,
    paired_folders,
    paired_from_folder,
    paired_synthetic,
    summarize,
    unpaired_folder,
)
from varlide.models.base import Enhancer, EnhanceResult, create_enhancer

SMALL = (64, 48)  # width, height: keeps pyiqa measures cheap


class Gain(Enhancer):
    """A test enhancer of our own: multiply by a constant (no n_iter, no VGPM)."""

    name = "gain"

    def __init__(self, k: float = 4.0) -> None:
        super().__init__()
        self.k = k

    @torch.no_grad()
    def enhance(self, images, visibility, blur):
        return EnhanceResult(images=(images * self.k).clamp(0, 1), route=["curve"] * len(images))


def _stack(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------ split


def test_held_out_images_are_the_trainers_by_content():
    """One rule (varlide.holdout): content hash below the fraction, the lowest ``limit``."""
    import hashlib

    from varlide import holdout

    blobs = {f"img/{i:05d}.jpg": f"image {i}".encode() for i in range(2000)}
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    paths = list(blobs)
    train, held = holdout.split(paths, sha.__getitem__, 0.1, limit=None)
    assert (train, held) == holdout.split(list(paths), sha.__getitem__, 0.1, limit=None)
    assert sorted(train + held) == paths and not set(train) & set(held)
    assert 150 < len(held) < 250  # ~10 %
    assert held == sorted((p for p in paths if holdout.content_fraction(sha[p]) < 0.1),
                          key=sha.__getitem__)
    # without a cap, adding files never moves an existing one across the split
    more = {f"new/{i}.png": f"new {i}".encode() for i in range(500)}
    sha.update({k: hashlib.sha256(v).hexdigest() for k, v in more.items()})
    _, held2 = holdout.split([*more, *paths[::-1]], sha.__getitem__, 0.1, limit=None)
    assert set(held2) & set(paths) == set(held)
    # fractions nest; the cap keeps the lowest hashes; renaming cannot move an image
    assert set(holdout.split(paths, sha.__getitem__, 0.05, None)[1]) <= set(held)
    assert holdout.split(paths, sha.__getitem__, 0.1, limit=48)[1] == held[:48]
    assert holdout.split(paths, sha.__getitem__, 0.0)[1] == []
    with pytest.raises(ValueError):
        holdout.split(paths, sha.__getitem__, 1.5)


def test_brightness_bands():
    assert [brightness_band(v) for v in (0.0, 0.1, 0.25, 0.5, 0.55, 0.9, 1.0)] == [
        "very dark", "very dark", "moderate", "moderate", "bright", "bright", "bright"]
    assert [b[0] for b in BANDS] == ["very dark", "moderate", "bright"]


# ------------------------------------------------------------------ sets


def test_paired_synthetic_is_deterministic_and_equals_the_demo_corpus(tmp_path):
    from varlide.demo import make_demo_corpus

    a = paired_synthetic(seeds=(0,), crops_per_photo=2)
    b = paired_synthetic(seeds=(0,), crops_per_photo=2)
    assert len(a) == 10 and [i.id for i in a.items] == [i.id for i in b.items]
    pairs = [item.load() for item in a.items]
    for (lo, ref), item in zip(pairs, b.items, strict=True):
        lo2, ref2 = item.load()
        assert lo.shape == (256, 256, 3) and lo.dtype == np.float32
        np.testing.assert_array_equal(lo, lo2)
        np.testing.assert_array_equal(ref, ref2)
    # bit-identical to the demo corpus files of the same seed at 256x256
    names = make_demo_corpus(str(tmp_path), count=10, size=(256, 256), seed=0)
    for name, (lo, ref) in zip(names, pairs, strict=True):
        file_lo = np.asarray(Image.open(tmp_path / "lowlight" / name), dtype=np.float32) / 255
        file_ref = np.asarray(Image.open(tmp_path / "reference" / name), dtype=np.float32) / 255
        np.testing.assert_array_equal(lo, file_lo)
        np.testing.assert_array_equal(ref, file_ref)
    # the same corpus read back as a folder pair (varlide eval INPUT --reference URI)
    folders = paired_folders(str(tmp_path / "lowlight"), str(tmp_path / "reference"))
    assert [i.id for i in folders.items] == names and folders.paired
    np.testing.assert_array_equal(folders.items[3].load()[0], pairs[3][0])
    # more seeds / crops extend the set without changing its existing items
    c = paired_synthetic(seeds=(0, 1), crops_per_photo=3, size=SMALL)
    d = paired_synthetic(seeds=(0,), crops_per_photo=2, size=SMALL)
    lookup = {i.id: i for i in c.items}
    for item in d.items:
        np.testing.assert_array_equal(item.load()[0], lookup[item.id].load()[0])
    assert d.items[0].load()[0].shape == (48, 64, 3)


def test_paired_from_folder_uses_well_exposed_images_only(tmp_path):
    for i, scale in enumerate((0.1, 0.55, 0.6, 0.65, 1.0)):  # mean luma ~0.05 .. ~0.5
        Image.fromarray(make_rgb(40, 56, seed=i, scale=scale)).save(tmp_path / f"{i}.png")
    s = paired_from_folder(str(tmp_path), brightness=(0.25, 0.45), seeds=(0, 1), limit=None)
    refs = sorted({item.meta["source"] for item in s.items})
    assert refs and "0.png" not in refs and "4.png" not in refs
    assert all(0.25 <= item.meta["ref_brightness"] <= 0.45 for item in s.items)
    assert len(s) == 2 * len(refs) and s.paired
    low, clean = s.items[0].load()
    assert low.shape == clean.shape == (40, 56, 3) and low.mean() < clean.mean()
    # a pair depends on its own path only, not on the other files of the folder
    (tmp_path / "extra").mkdir()
    Image.fromarray(make_rgb(40, 56, seed=9, scale=0.6)).save(tmp_path / "extra" / "x.png")
    s2 = paired_from_folder(str(tmp_path), brightness=(0.25, 0.45), seeds=(0, 1), limit=None)
    again = {i.id: i for i in s2.items}
    np.testing.assert_array_equal(again[s.items[0].id].load()[0], low)
    # explicit candidates (e.g. a held-out split)
    s3 = paired_from_folder(str(tmp_path), rel_paths=[refs[0]], brightness=None, limit=None)
    assert [i.meta["source"] for i in s3.items] == [refs[0]]


# ------------------------------------------------------------------ measures


def test_input_row_psnr_equals_direct_psnr_of_degraded_vs_clean():
    from varlide.iqa import create_metric

    s = paired_synthetic(seeds=(0,), crops_per_photo=1, size=SMALL)
    per = measure({"input": None}, [s], paired_metrics=("psnr", "brightness"), batch_size=3)
    assert list(per["enhancer"].unique()) == ["input"] and len(per) == len(s)
    pairs = [item.load() for item in s.items]
    direct = create_metric("psnr")(_stack([p[0] for p in pairs]), _stack([p[1] for p in pairs]))
    got = per.set_index("image").loc[[i.id for i in s.items], "psnr"].to_numpy()
    np.testing.assert_allclose(got, direct.numpy(), rtol=0, atol=1e-9)
    summary = summarize(per)
    assert summary["psnr_mean"].iloc[0] == pytest.approx(float(direct.mean()), abs=1e-9)
    assert summary["n"].iloc[0] == len(s)


def test_separable_ssim_equals_pyiqa_ssim():
    from varlide.iqa import create_metric

    s = paired_synthetic(seeds=(0,), crops_per_photo=1, size=SMALL)
    pairs = [item.load() for item in s.items]
    low, ref = _stack([p[0] for p in pairs]), _stack([p[1] for p in pairs])
    ours, theirs = SeparableSSIM(), create_metric("ssim")
    for x in (low, (low * 6).clamp(0, 1), ref):
        np.testing.assert_allclose(ours(x, ref).numpy(), theirs(x, ref).numpy(), atol=1e-6)
    assert ours.info.lower_better is False


def test_classic_curve_brings_very_dark_images_into_the_band_more_than_input():
    s = paired_synthetic(seeds=(0, 1), crops_per_photo=1, size=SMALL)
    lows = [item.load()[0] for item in s.items]
    dark = EvalSet.from_arrays("dark", lows, by_band=True)
    per = measure({"classic-curve": create_enhancer("classic-curve")}, [dark],
                  unpaired_metrics=("brightness",))
    assert set(per["band"]) == {"very dark"}  # demo degradations are very dark
    df = summarize(per, sets=[dark])
    assert set(df["band"]) == {"all"}  # one band only: no duplicate band rows
    rows = df.set_index("enhancer")
    assert list(rows.index) == ["input", "classic-curve"] and rows.loc["input", "n"] == 10
    assert rows.loc["input", "in_band_mean"] == 0.0
    assert rows.loc["classic-curve", "in_band_mean"] > rows.loc["input", "in_band_mean"]
    mid = sum(TARGET_BAND) / 2
    assert (abs(rows.loc["classic-curve", "brightness_mean"] - mid)
            < abs(rows.loc["input", "brightness_mean"] - mid))


def test_table_has_a_row_per_enhancer_and_set_and_direction_markers():
    paired = paired_synthetic(seeds=(0,), crops_per_photo=1, size=SMALL)
    real = EvalSet.from_arrays(
        "real", [make_rgb(48, 64, seed=i, scale=sc) for i, sc in enumerate((0.2, 0.3, 0.5, 0.8))]
        + [make_rgb(40, 40, seed=7, scale=0.1)],  # another size: its own batch
        by_band=True)
    enhancers = {"input": None, "classic-curve": "classic-curve", "gain": Gain(4.0)}
    per = measure(enhancers, [paired, real], batch_size=2,
                  unpaired_metrics=("brightness", "overexposed", "entropy", "sharpness"))
    assert len(per) == 3 * (len(paired) + len(real))
    assert per.loc[per["enhancer"] == "classic-curve", "n_iter"].notna().all()
    assert per.loc[per["enhancer"] == "gain", "n_iter"].isna().all()
    df = summarize(per, sets=[paired, real])
    alls = df[df["band"] == "all"]
    assert sorted(zip(alls["set"], alls["enhancer"], strict=True)) == sorted(
        (s, e) for s in ("synthetic", "real") for e in enhancers)
    assert set(df.loc[df["set"] == "synthetic", "band"]) == {"all"}  # paired: no bands
    assert {"very dark", "moderate"} <= set(df.loc[df["set"] == "real", "band"])
    assert (df.loc[df["set"] == "real", "n"] > 0).all()
    table = format_table(df)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    body = [ln for ln in lines if not ln.startswith(("| set", "| ---"))]
    assert len(body) == len(df)
    for enh in enhancers:
        for name in ("synthetic", "real"):
            assert any(f"| {name} |" in ln and f"| {enh} |" in ln for ln in body)
    assert "psnr ↑" in table and "ssim ↑" in table and "overexposed ↓" in table
    assert "entropy ↑" in table and "in [0.40, 0.55] ↑" in table
    assert "| brightness |" in table or "| brightness" in table  # no direction
    assert "**" in table  # best enhancer marked


# ------------------------------------------------------------------ real images


def test_unpaired_dev_lowlight(shared_data):
    folder = shared_data / "dev-lowlight"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    s = unpaired_folder(str(folder), max_side=192)
    assert len(s) == 9 and not s.paired and s.by_band
    df = evaluate({"classic-curve": "classic-curve"}, [s], iqa_max_side=192)
    inp = df[(df["enhancer"] == "input")].set_index("band")
    assert inp.loc["all", "n"] == 9
    assert inp.loc["very dark", "n"] == 8 and inp.loc["moderate", "n"] == 1  # 4.png: 0.32
    out = df[(df["enhancer"] == "classic-curve")].set_index("band")
    assert out.loc["very dark", "brightness_mean"] > inp.loc["very dark", "brightness_mean"] + 0.2
    for m in ("piqe", "entropy", "sharpness", "overexposed", "in_band"):
        assert np.isfinite(out.loc["all", f"{m}_mean"])
    assert "piqe ↓" in format_table(df)


def test_default_sets_on_shared_data(shared_data):
    from varlide.evaluation import MODERATE, WELL_EXPOSED, default_sets

    if not (shared_data / "train-sice").is_dir():
        pytest.skip(f"{shared_data / 'train-sice'} is absent")
    sets = default_sets(str(shared_data), synthetic=False, pseudo_limit=2, moderate_limit=2)
    by_name = {s.name: s for s in sets}
    assert list(by_name) == ["sice-paired", "dev-lowlight", "sice-moderate"]
    paired, moderate = by_name["sice-paired"], by_name["sice-moderate"]
    assert len(paired) == 2 and len(moderate) == 2
    from varlide import holdout

    held = set(holdout.split_corpus(str(shared_data / "train-sice"))[1])
    assert len(held) == 48  # what the shipped weights' config.json records as held out
    assert {i.meta["source"] for i in paired.items + moderate.items} <= held
    assert all(WELL_EXPOSED[0] <= i.meta["ref_brightness"] <= WELL_EXPOSED[1]
               for i in paired.items)
    x, ref = paired.items[0].load()
    assert ref is not None and max(x.shape) == 256 and x.mean() < ref.mean()
    x, ref = moderate.items[0].load()
    assert ref is None and MODERATE[0] - 0.01 <= float(x.mean()) <= MODERATE[1] + 0.05
