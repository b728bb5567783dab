"""The learned enhancers: curve net, VICM, VGPM, varlide-lite and zero-dce (tiny configs)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from varlide.models import ENHANCERS, Enhancer, create_enhancer
from varlide.models.curve_net import CurveNet, apply_curves
from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig
from varlide.models.vgpm import VGPM, band_mask, radial_frequency
from varlide.models.vicm import VICM, hard_iterations, iteration_mask
from varlide.models.zero_dce import ZeroDCE, ZeroDCEConfig

TINY = dict(width=4, vgpm_width=4, hidden=4)


def _rand(b=2, h=24, w=30, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * scale


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (the zero-initialised ones too) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- curve net


def test_curve_net_is_zero_dce_sized_and_bounded():
    net = CurveNet()
    assert sum(p.numel() for p in net.parameters()) == 79_416  # the reference's count
    tiny = CurveNet(n_maps=8, width=4)
    maps = tiny(_rand())
    assert maps.shape == (2, 24, 24, 30) and maps.abs().max() <= 1


def test_downscaled_estimation_returns_full_size_maps():
    net = CurveNet(width=4, downscale=4)
    x = _rand(h=40, w=52)
    maps = net(x)
    assert maps.shape == (2, 24, 40, 52)
    assert net(x, downscale=1).shape == maps.shape  # per-call override


def test_apply_curves_brightens_darkens_and_stays_in_range():
    x = torch.linspace(0, 1, 101).view(1, 1, 1, -1).expand(1, 3, 1, 101)
    ones = torch.ones(1, 24, 1, 101)
    up, down, same = (apply_curves(x, s * ones) for s in (1.0, -1.0, 0.0))
    assert torch.equal(same, x.float())
    assert (up >= x - 1e-7).all() and (down <= x + 1e-7).all()
    assert (up[..., 50] > 0.9).all() and (down[..., 50] < 0.1).all()
    for y in (up, down):
        assert y.min() >= 0 and y.max() <= 1
        assert (y.diff(dim=-1) >= -1e-7).all()  # order of pixel values kept


# --------------------------------------------------------------------------- VICM


def test_iteration_masks():
    tau = torch.tensor([1.0, 3.4, 3.6, 8.0])
    n = hard_iterations(tau, 8)
    assert n.tolist() == [1, 3, 4, 8]
    hard = iteration_mask(tau, 8, "hard")
    assert hard.sum(1).tolist() == [1, 3, 4, 8]
    soft = iteration_mask(tau, 8, "soft", temperature=0.01)
    assert torch.allclose(soft, hard, atol=1e-3)
    warm = iteration_mask(tau, 8, "soft", temperature=1.0)
    assert ((warm > 0) & (warm < 1)).all()
    ste = iteration_mask(tau.requires_grad_(), 8, "ste", temperature=1.0)
    assert torch.equal(ste.detach(), hard)
    ste.sum().backward()
    assert tau.grad.abs().sum() > 0  # the straight-through mask still trains Theta_v


def test_vicm_hard_truncation_zeroes_maps_beyond_n_v():
    torch.manual_seed(0)
    vicm = VICM(width=4, hidden=4)
    _perturb(vicm)
    x, v = _rand(scale=0.3), torch.tensor([0.05, 0.9])
    r = vicm(x, v, mask="hard")
    n_v = r["n_iter"]
    assert ((n_v >= 1) & (n_v <= 8)).all()
    maps = r["maps"].clone()
    for i, n in enumerate(n_v.tolist()):
        maps[i, 3 * n:] = 0  # A_j = 0 for j > n_v
    assert torch.allclose(r["image"], apply_curves(x, maps), atol=1e-6)


def test_fixed_n_vicm_has_no_theta_v():
    vicm = VICM(width=4, adaptive=False)
    assert vicm.theta_v is None
    r = vicm(_rand(), torch.tensor([0.1, 0.9]))
    assert r["n_iter"].tolist() == [8, 8] and r["weights"] is None


# --------------------------------------------------------------------------- VGPM


def test_band_mask_keeps_dc_and_low_band_out():
    m = band_mask(64, 64, 1 / 32)
    r = radial_frequency(64, 64)
    assert m.shape == (64, 33) and m[0, 0] == 0
    assert (m[r <= 1 / 32] == 0).all() and (m[r >= 2 / 32] == 1).all()
    assert ((m >= 0) & (m <= 1)).all()


@pytest.mark.parametrize("h,w", [(24, 30), (17, 23)])
def test_untrained_vgpm_is_identity(h, w):
    vgpm = VGPM(width=4, hidden=4)
    x = _rand(h=h, w=w)
    out = vgpm(x, torch.tensor([0.2, 0.9]))
    assert out["strength"].tolist() == [0.0, 0.0]
    assert out["image"].shape == x.shape and not out["image"].is_complex()
    assert (out["image"] - x).abs().max() < 1e-5
    spec = torch.fft.rfft2(x, norm="ortho")
    assert torch.allclose(out["phase"], torch.angle(spec), atol=1e-5)


def test_trained_vgpm_changes_phase_not_mean():
    torch.manual_seed(0)
    vgpm = VGPM(width=4, hidden=4)
    _perturb(vgpm)
    with torch.no_grad():
        vgpm.theta_b.net[-1].bias.fill_(0.8)
    x = _rand(h=32, w=32)
    out = vgpm(x, torch.tensor([0.3, 0.9]))
    s = out["strength"]
    assert ((s > 0) & (s <= 1)).all()
    assert (out["image"] - x).abs().mean() > 1e-3  # it does something ...
    # ... but never to the DC term (the image mean) nor the amplitude spectrum
    assert torch.allclose(out["image"].mean((-2, -1)), x.mean((-2, -1)), atol=1e-5)
    amp_in = torch.fft.rfft2(x, norm="ortho").abs()
    amp_out = torch.fft.rfft2(out["image"], norm="ortho").abs()
    # irfft2 symmetrises the self-conjugate columns; elsewhere the amplitude is kept
    assert torch.allclose(amp_in[..., 1:-1], amp_out[..., 1:-1], atol=1e-4)


# --------------------------------------------------------------------------- varlide-lite


@pytest.fixture
def tiny_lite(tmp_path):
    torch.manual_seed(0)
    model = VarlideLite(VarlideLiteConfig(**TINY))
    _perturb(model)
    with torch.no_grad():
        model.vgpm.theta_b.net[-1].weight.zero_()
        model.vgpm.theta_b.net[-1].bias.fill_(0.5)
    model.save_pretrained(tmp_path / "lite")
    return model, tmp_path / "lite"


def test_registered_names():
    assert {"varlide-lite", "zero-dce", "classic-curve"} <= set(ENHANCERS.names())


def test_missing_default_weights_error_names_the_file_and_command(monkeypatch, tmp_path):
    import varlide.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "none")
    for name in ("varlide-lite", "zero-dce", "restorer"):
        with pytest.raises(FileNotFoundError, match="varlide train") as err:
            create_enhancer(name)
        assert f"{name}/model.safetensors" in str(err.value)


def test_save_load_round_trip(tiny_lite):
    model, folder = tiny_lite
    data = (folder / "model.safetensors").read_bytes()
    meta = json.loads((folder / "config.json").read_text())
    assert meta["enhancer"] == "varlide-lite" and meta["trained_prior"] == "analytic"
    assert meta["model"]["width"] == 4 and meta["sha256"] == hashlib.sha256(data).hexdigest()
    loaded = create_enhancer("varlide-lite", weights=str(folder))
    assert isinstance(loaded, Enhancer) and not loaded.training
    sha = hashlib.sha256(data).hexdigest()[:12]
    assert loaded.version == f"{sha}+hl" == model.version and loaded.weights_version == sha
    assert create_enhancer("varlide-lite", weights=str(folder), highlights=False).version == sha
    again = VarlideLite.from_pretrained(str(folder / "model.safetensors"))
    x, v, b = _rand(), torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.9])
    r1, r2 = loaded.enhance(x, v, b), again.enhance(x, v, b)
    assert torch.equal(r1.images, r2.images)


def test_load_through_fsspec_and_refusals(tiny_lite, tmp_path):
    import fsspec

    model, folder = tiny_lite
    mem = fsspec.filesystem("memory")
    for name in ("model.safetensors", "config.json"):
        mem.pipe_file(f"/w/lite/{name}", (folder / name).read_bytes())
    assert VarlideLite.from_pretrained("memory://w/lite").version == model.version
    with pytest.raises(ValueError, match="not 'zero-dce'"):
        ZeroDCE.from_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-4]
                                               + b"\0\0\0\0")
    with pytest.raises(ValueError, match="sha256"):
        VarlideLite.from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        VarlideLite.from_pretrained(str(tmp_path / "nowhere"))


def test_routing_skip_curve_full(tiny_lite):
    _, folder = tiny_lite
    m = create_enhancer("varlide-lite", weights=str(folder), skip_visibility=(0.8, 0.95),
                        full_blur=0.5)
    x = _rand(b=5, scale=0.5)
    v = torch.tensor([0.9, 0.1, 0.1, 0.99, 0.85])
    b = torch.tensor([0.2, 0.2, 0.8, 0.3, 0.9])
    r = m.enhance(x, v, b)
    # exposure decides first: a well-exposed frame skips even when its blur score is high
    assert r.route == ["skip", "curve", "full", "curve", "skip"]
    assert torch.equal(r.images[0], x[0]) and torch.equal(r.images[4], x[4])  # untouched
    assert r.n_iter.dtype == torch.int16 and r.n_iter[[0, 4]].tolist() == [0, 0]
    assert (r.n_iter[1:4] >= 1).all()
    assert r.phase_strength[[0, 1, 3, 4]].tolist() == [0] * 4 and r.phase_strength[2] > 0
    assert r.images.min() >= 0 and r.images.max() <= 1
    # the same image through each route alone gives the same output (no batch coupling)
    alone = m.enhance(x[2:3], v[2:3], b[2:3])
    assert torch.allclose(alone.images[0], r.images[2], atol=1e-6)
    # evaluation setting: always full
    m.set_inference(skip_visibility=None, full_blur=0.0)
    assert m.enhance(x, v, b).route == ["full"] * 5


def test_varlide_lite_without_vgpm_never_routes_full(tmp_path):
    model = VarlideLite(VarlideLiteConfig(vgpm=False, **TINY), full_blur=0.0,
                        skip_visibility=None)
    r = model.enhance(_rand(), torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.9]))
    assert r.route == ["curve", "curve"] and r.phase_strength is None


def test_downscale_setting_and_training_forward(tiny_lite):
    model, _ = tiny_lite
    x, v, b = _rand(h=32, w=40), torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.9])
    out = model(x, v, b, mask="soft", temperature=0.5)
    assert out["image"].shape == x.shape and out["phase"].shape == (2, 3, 32, 21)
    assert out["weights"].shape == (2, 8) and out["strength"].shape == (2,)
    model.set_inference(downscale=2, full_blur=0.0, skip_visibility=None)
    r = model.enhance(x, v, b)
    assert r.images.shape == x.shape


def test_zero_dce_fixed_iterations_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ZeroDCE(ZeroDCEConfig(width=4))
    _perturb(model)
    version = model.save_pretrained(tmp_path / "zd")
    loaded = create_enhancer("zero-dce", weights=str(tmp_path / "zd"))
    assert loaded.version == version and len(version) == 12
    x = _rand(scale=0.2)
    r = loaded.enhance(x, torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.9]))
    assert r.route == ["curve", "curve"] and r.n_iter.tolist() == [8, 8]
    assert r.phase_strength is None
    assert torch.allclose(r.images, apply_curves(x, model.curve(x)).clamp(0, 1), atol=1e-6)


def test_bf16_close_to_fp32(tiny_lite):
    model, _ = tiny_lite
    model.set_inference(skip_visibility=None, full_blur=0.0, precision="fp32")
    x, v, b = _rand(scale=0.4), torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.9])
    ref = model.enhance(x, v, b).images
    model.set_inference(skip_visibility=None, full_blur=0.0, precision="bf16")
    low = model.enhance(x, v, b).images
    assert (low - ref).abs().mean() < 0.02 and not math.isnan(low.sum().item())


def test_prior_mismatch_message(tiny_lite):
    _, folder = tiny_lite
    m = VarlideLite.from_pretrained(str(folder))
    m.trained_prior_model = "analytic-v1"
    assert m.prior_mismatch("analytic", "analytic-v1") is None
    assert "calibrate" in m.prior_mismatch("clip", "ViT-B-32")


def _rewrite_weights(folder, state):
    """Replace the folder's weights with ``state`` and its config's sha256 to match (what a
    user's own conversion would produce)."""
    from safetensors.torch import save

    data = save(state)
    (folder / "model.safetensors").write_bytes(data)
    meta = json.loads((folder / "config.json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "config.json").write_text(json.dumps(meta))


def test_pickled_checkpoints_are_refused_unread(tiny_lite):
    import pickle

    model, folder = tiny_lite
    marker = folder / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for blob, kind in ((pickle.dumps(Boom()), "a pickle"), (b"PK\x03\x04zip", "a zip")):
        (folder / "model.safetensors").write_bytes(blob)
        meta = json.loads((folder / "config.json").read_text())
        meta["sha256"] = hashlib.sha256(blob).hexdigest()
        (folder / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=f"is {kind}.*never loads pickled"):
            VarlideLite.from_pretrained(str(folder))
        assert not marker.exists()
    _rewrite_weights(folder, model.state_dict())
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    meta = json.loads((folder / "config.json").read_text())
    meta.pop("sha256")
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        VarlideLite.from_pretrained(str(folder))


def test_weights_with_wrong_shapes_or_dtypes_are_refused(tiny_lite):
    model, folder = tiny_lite
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name, first = next((k, v) for k, v in state.items() if v.ndim >= 2)
    _rewrite_weights(folder, {**state, name: torch.zeros(first.shape[0] + 1, *first.shape[1:])})
    with pytest.raises(ValueError, match=f"{name}: shape .*expected"):
        VarlideLite.from_pretrained(str(folder))
    _rewrite_weights(folder, {**state, name: first.double()})
    with pytest.raises(ValueError, match=f"{name}: dtype torch.float64, expected torch.float32"):
        VarlideLite.from_pretrained(str(folder))
    _rewrite_weights(folder, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match=f"missing {name}"):
        VarlideLite.from_pretrained(str(folder))
    _rewrite_weights(folder, state)  # the same tensors again: loads, same outputs
    again = VarlideLite.from_pretrained(str(folder))
    x, v, b = _rand(), torch.tensor([0.1, 0.5]), torch.tensor([0.9, 0.9])
    model.eval()
    assert torch.equal(again.enhance(x, v, b).images, model.enhance(x, v, b).images)
