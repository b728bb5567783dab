"""pyiqa's learned metrics by name: metadata, weight-free ones running, the others failing
clearly (naming the file and `varlide weights pull`) before pyiqa is even imported, and
before a run starts (``--dry-run`` included)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import make_rgb
from PIL import Image

from varlide import weights
from varlide.cli import main
from varlide.iqa import create_metric, metric_info
from varlide.iqa.base import Metric, MetricInfo, metric_weights
from varlide.iqa.measure import measure as _measure

LEARNED = ("niqe", "musiq", "maniqa", "clipiqa", "brisque", "lpips")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "varlide"))
    weights.set_offline(True)
    return tmp_path


def test_directions_and_ranges_come_from_pyiqa():
    expect = {"niqe": (True, False), "brisque": (True, False), "musiq": (False, False),
              "maniqa": (False, False), "clipiqa": (False, False), "lpips": (True, True),
              "gmsd": (True, True)}
    for name, (lower, ref) in expect.items():
        info = metric_info(name)
        assert info.source == "pyiqa" and info.lower_better is lower, name
        assert info.needs_reference is ref, name
    assert metric_info("clipiqa").value_range == (0.0, 1.0)
    assert metric_info("musiq").value_range == (0.0, 100.0)


def test_every_learned_metric_has_catalogued_files():
    for name in LEARNED:
        files = metric_weights(name)
        assert files, name
        assert all(f.url for f in files), name  # `varlide weights pull` can fetch them
    assert metric_weights("piqe") == () and metric_weights("brightness") == ()
    assert metric_weights("topiq_nr") is None  # not catalogued: said so, not guessed


@pytest.mark.parametrize("name", LEARNED)
def test_missing_weights_give_the_clear_error(name, empty_caches):
    with pytest.raises(weights.WeightsMissingError) as err:
        create_metric(name)
    msg = str(err.value)
    first = metric_weights(name)[0]
    assert f"metric {name}" in msg and str(first.path()) in msg
    assert str(empty_caches) in msg and "varlide weights pull" in msg


def test_weight_free_pyiqa_metrics_run(empty_caches):
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    y = (x * 0.8 + 0.1).clamp(0, 1)
    for name in ("piqe", "gmsd", "fsim", "vif"):
        m = create_metric(name)
        out = m(x, y) if m.info.needs_reference else m(x)
        assert out.shape == (2,) and out.dtype == torch.float64
        assert all(math.isfinite(v) for v in out.tolist()), name
    assert bool(create_metric("gmsd").net.lower_better) is metric_info("gmsd").lower_better


def test_pyiqa_clip_metrics_import():
    """pyiqa's CLIP metrics import `pkg_resources` (via openai `clip`): the setuptools pin."""
    import pyiqa.archs.clipiqa_arch as arch

    assert hasattr(arch, "CLIPIQA")


def test_uncatalogued_metric_is_refused_offline_not_silently_downloaded(empty_caches):
    with pytest.raises(weights.WeightsMissingError, match="not catalogued|tried to download"):
        create_metric("nima")


def test_pyiqa_measures_see_the_capped_size():
    seen = []

    class Probe(Metric):
        info = MetricInfo("probe", True, None, source="pyiqa")

        def __call__(self, images, reference=None):
            seen.append(tuple(images.shape[-2:]))
            return torch.zeros(images.shape[0], dtype=torch.float64)

    _measure(Probe(), torch.rand(2, 3, 120, 200), 50)
    _measure(Probe(), torch.rand(2, 3, 40, 30), 50)  # never upscaled
    assert seen == [(30, 50), (40, 30)]
    assert create_metric("piqe").capped and not create_metric("brightness").capped


def _png_corpus(root, n=2):
    root.mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_rgb(24, 32, seed=i, scale=0.2)).save(buf, "PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
    return str(root)


def test_dry_run_lists_weights_and_fails_on_missing(empty_caches, capsys):
    inp = _png_corpus(empty_caches / "in")
    out = str(empty_caches / "out")
    rc = main(["enhance", inp, out, "--dry-run", "--metrics", "brightness,niqe,musiq"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "metric niqe" in cap.out and "MISSING" in cap.out
    assert "niqe_modelparameters.mat" in cap.err and "musiq_koniq_ckpt" in cap.err
    assert "varlide weights pull" in cap.err
    rc = main(["enhance", inp, out, "--dry-run", "--metrics", "brightness,piqe"])
    cap = capsys.readouterr()
    assert rc == 0 and "dry run: nothing written" in cap.out
    assert "prior   analytic/analytic-v1" in cap.out
    # not only the dry run: the real run stops before starting (no output written)
    rc = main(["enhance", inp, out, "--metrics", "niqe", "--no-progress"])
    assert rc == 2 and "niqe_modelparameters.mat" in capsys.readouterr().err
    assert not (empty_caches / "out").exists()
