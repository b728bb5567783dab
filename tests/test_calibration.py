"""Prior calibration: the monotone quantile map, its file, and the run-side decision."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_rgb
from PIL import Image
from test_clip_prior import TINY, install_tiny_clip

from varlide import weights
from varlide.cli import main
from varlide.config import Config
from varlide.priors.base import PriorScores
from varlide.priors.calibration import (
    UNCALIBRATED,
    Calibration,
    QuantileMap,
    calibrate,
    fit_calibration,
    prior_for_run,
    prior_scale_tags,
    resolve_auto_prior,
)
from varlide.resolver import trained_prior_of


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return install_tiny_clip(tmp_path / "cache")


def _corpus(root, n=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_rgb(40, 56, seed=i, scale=0.1 + 0.08 * i)).save(buf, "PNG")
        (root / f"f{i:02d}.png").write_bytes(buf.getvalue())
    return str(root)


def test_quantile_map_is_monotone_and_maps_quantiles():
    rng = np.random.default_rng(0)
    src = rng.beta(2, 5, 2000)
    tgt = rng.beta(5, 2, 2000) ** 2
    m = QuantileMap.fit(src, tgt)
    assert all(np.diff(m.x) > 0) and all(np.diff(m.y) >= 0)
    grid = torch.linspace(-0.2, 1.2, 1001)
    out = m(grid)
    assert (out[1:] >= out[:-1]).all() and (out >= 0).all() and (out <= 1).all()
    qs = np.linspace(0, 1, 101)
    mapped = m(torch.tensor(np.quantile(src, qs), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(mapped, np.quantile(tgt, qs), atol=1e-5)
    # the mapped reference distribution is the target's
    mapped_all = m(torch.tensor(src, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(np.quantile(mapped_all, [0.1, 0.5, 0.9]),
                               np.quantile(tgt, [0.1, 0.5, 0.9]), atol=0.01)


def test_quantile_map_merges_ties():
    src = np.array([0.2] * 60 + list(np.linspace(0.3, 0.9, 40)))
    tgt = np.linspace(0, 1, 100)
    m = QuantileMap.fit(src, tgt)
    assert all(np.diff(m.x) > 0) and all(np.diff(m.y) >= 0)
    v = m(torch.tensor([0.1, 0.2, 0.25, 0.95]))
    assert (v[1:] >= v[:-1]).all()
    with pytest.raises(ValueError):
        QuantileMap.fit(np.array([0.5]), np.array([0.1, 0.2]))


def test_calibration_file_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    s, t = rng.random((2, 300)), rng.random((2, 300)) ** 3
    cal = fit_calibration(("clip", "ViT-B-32:openai"), ("analytic", "analytic-v1"),
                          s[0], s[1], t[0], t[1], reference="/ref")
    assert cal.id.startswith("clip/ViT-B-32:openai->analytic/analytic-v1@")
    path = tmp_path / "c.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.id == cal.id and back.images == 300
    x = PriorScores(torch.rand(5), torch.rand(5))
    a, b = cal.apply(x), back.apply(x)
    assert torch.equal(a.visibility, b.visibility) and torch.equal(a.blur, b.blur)


def test_same_backend_is_native(tmp_path):
    cfg = Config(prior="analytic")
    enh = SimpleNamespace(trained_prior="analytic", trained_prior_model="analytic-v1")
    p = prior_for_run(cfg, enh, "cpu")
    assert p.calibration is None and p.backend == "analytic"
    assert prior_for_run(cfg, None, "cpu").calibration is None  # no enhancer: no scale


def test_auto_is_the_enhancers_backend():
    cfg = Config(prior="auto")
    assert resolve_auto_prior(cfg, ("clip", "ViT-B-16:openai+prompts-12345678")) == (
        "clip", "ViT-B-16:openai")
    assert resolve_auto_prior(cfg, ("analytic", "analytic-v1")) == ("analytic", None)
    assert resolve_auto_prior(cfg, None) == ("analytic", None)
    assert trained_prior_of(Config()) == ("analytic", "analytic-v1")  # classic-curve
    assert trained_prior_of(Config(enhance=False)) is None
    p = prior_for_run(cfg, SimpleNamespace(trained_prior="analytic", trained_prior_model=None),
                      "cpu")
    assert p.backend == "analytic" and p.calibration is None


def test_uncalibrated_warns_then_calibration_is_applied(tiny, tmp_path, caplog):
    cfg = Config(prior="clip", prior_model=tiny)  # classic-curve: trained on analytic
    enh = SimpleNamespace(trained_prior="analytic", trained_prior_model="analytic-v1")
    with caplog.at_level(logging.WARNING, logger="varlide.priors.calibration"):
        raw = prior_for_run(cfg, enh, "cpu")
    assert raw.calibration == UNCALIBRATED + "analytic/analytic-v1"
    assert "PRIOR SCALE MISMATCH" in caplog.text and "varlide calibrate" in caplog.text

    ref = _corpus(tmp_path / "ref")
    cal, out = calibrate(ref, cfg, target=("analytic", "analytic-v1"))
    assert cal.images == 12 and cal.source == ("clip", TINY)
    assert out.startswith(str(tmp_path / "cache" / "calibrations"))
    assert any(k.startswith("cache/calibrations/") for k in weights.read_lock()["files"])

    mapped = prior_for_run(cfg, enh, "cpu")  # found beside the weights, applied
    assert mapped.calibration == cal.id
    x = torch.rand(4, 3, 40, 56)
    expect = cal.apply(raw.score(x))
    got = mapped.score(x)
    assert torch.equal(got.visibility, expect.visibility) and torch.equal(got.blur, expect.blur)
    # the mapped reference scores land on the analytic ones' quantiles
    from varlide.priors import create_prior
    from varlide.priors.calibration import score_corpus

    (m, a), _ = score_corpus([mapped, create_prior("analytic")], ref, cfg)
    # (12 images, 101 knots: exact at the ends, within the knot spacing between)
    np.testing.assert_allclose(np.sort(m[:, 0]), np.sort(a[:, 0]), atol=0.02)
    np.testing.assert_allclose(np.sort(m[:, 0])[[0, -1]], np.sort(a[:, 0])[[0, -1]], atol=1e-5)

    explicit = prior_for_run(cfg.model_copy(update={"prior_calibration": out}), enh, "cpu")
    assert explicit.calibration == cal.id
    wrong = prior_for_run  # a calibration for another pair is refused
    with pytest.raises(ValueError, match="but this run needs"):
        wrong(cfg.model_copy(update={"prior_calibration": out}),
              SimpleNamespace(trained_prior="clip", trained_prior_model="RN50:openai"), "cpu")


def test_calibrate_cli(tiny, tmp_path, capsys):
    ref = _corpus(tmp_path / "ref", n=6)
    out = tmp_path / "cal.json"
    rc = main(["calibrate", ref, "--prior", "clip", "--prior-model", tiny, "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    cal = Calibration.load(out)
    assert cal.source == ("clip", TINY) and cal.target == ("analytic", "analytic-v1")
    assert cal.id in capsys.readouterr().out
    rc = main(["calibrate", ref, "--prior", "analytic"])
    assert rc == 2 and "already the target scale" in capsys.readouterr().err


def test_prior_scale_tags():
    import pyarrow as pa

    t = pa.table({"prior_calibration": [None, UNCALIBRATED + "analytic/analytic-v1"]})
    tags = prior_scale_tags(t)
    assert tags["varlide.prior_uncalibrated"] == "true"
    assert prior_scale_tags(pa.table({"prior_calibration": pa.array([None], pa.string())})) == {
        "varlide.prior_calibration": "native"}
