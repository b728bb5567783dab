"""The ``clip`` prior on a tiny random-initialised open_clip model.

The tiny architecture is registered with open_clip at test time, its random weights saved
to a local file and installed in the weights cache the way `varlide weights pull` installs
a real checkpoint, then loaded through the same code path as ``ViT-B-32:openai`` (an
``ARCH:TAG`` resolved by ``varlide.weights`` and ``open_clip.create_model(pretrained=FILE)``).
Nothing here needs real weights; scores of a random model only have to obey the contract.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from varlide import weights
from varlide.config import DEFAULT_CLIP_BLUR_PROMPTS, DEFAULT_CLIP_VISIBILITY_PROMPTS
from varlide.priors import PRIORS, clip_files, create_prior

TINY_ARCH = "varlide-tiny-test"
TINY_TAG = "random"
TINY = f"{TINY_ARCH}:{TINY_TAG}"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                   "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}
_REGISTERED = threading.Lock()
_STATE: dict[str, Path] = {}


def register_tiny_arch() -> None:
    """Make ``varlide-tiny-test`` an open_clip model name (once per process)."""
    import open_clip

    with _REGISTERED:
        if "cfg" in _STATE:
            return
        folder = Path(tempfile.mkdtemp(prefix="varlide-tiny-clip-"))
        (folder / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(folder)
        _STATE["cfg"] = folder


def tiny_checkpoint_bytes(seed: int = 0) -> bytes:
    """Random weights of the tiny model, as a safetensors file's bytes (deterministic)."""
    import open_clip
    from safetensors.torch import save

    register_tiny_arch()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_ARCH)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def make_tiny_hub(hub: Path, seed: int = 0) -> Path:
    """A local "hub" folder holding the tiny checkpoint under its weights key, the tag
    registered with ``varlide.weights`` (source: that folder). Returns the file."""
    register_tiny_arch()
    wf = clip_files.register_clip_checkpoint(TINY_ARCH, TINY_TAG, url=None)
    path = hub / wf.key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_checkpoint_bytes(seed))
    clip_files.register_clip_checkpoint(TINY_ARCH, TINY_TAG, url=str(path))
    return path


def install_tiny_clip(cache: Path, seed: int = 0) -> str:
    """Point the weights cache at ``cache`` and pull the tiny checkpoint into it, like a
    real one. Returns the ``prior_model`` string."""
    os.environ["VARLIDE_WEIGHTS_CACHE"] = str(cache)
    hub = cache.parent / (cache.name + "-hub")
    make_tiny_hub(hub, seed)
    acts = weights.pull([weights.Requirement(clip_files.clip_checkpoint(TINY_ARCH, TINY_TAG),
                                             "test")], progress=False)
    assert acts[0].what in ("pulled", "present"), acts
    return TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    saved = os.environ.get("VARLIDE_WEIGHTS_CACHE")
    cache = tmp_path_factory.mktemp("weights") / "cache"
    spec = install_tiny_clip(cache)
    yield spec
    if saved is None:
        os.environ.pop("VARLIDE_WEIGHTS_CACHE", None)
    else:
        os.environ["VARLIDE_WEIGHTS_CACHE"] = saved


@pytest.fixture(scope="module")
def prior(tiny):
    return create_prior("clip", model=tiny)


def _images(n: int = 8, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 4, w // 4, generator=g)
    x = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    scale = torch.linspace(0.1, 1.0, n).view(n, 1, 1, 1)
    return (x * scale).clamp(0, 1)


def test_registered_and_parsed():
    assert "clip" in PRIORS.names()
    spec = clip_files.parse_clip_model(None)
    assert (spec.kind, spec.arch, spec.tag) == ("tag", "ViT-B-32", "openai")
    assert clip_files.parse_clip_model("RN50:openai").label == "RN50:openai"
    f = clip_files.parse_clip_model("ViT-B-32:/x/y/ckpt.safetensors")
    assert f.kind == "file" and f.path.endswith("ckpt.safetensors")
    assert clip_files.parse_clip_model("local-dir:/m").kind == "local-dir"
    assert clip_files.parse_clip_model("hf-hub:org/repo").path == "org/repo"
    with pytest.raises(ValueError, match="ARCH:TAG"):
        clip_files.parse_clip_model("ViT-B-32")
    with pytest.raises(ValueError, match="mirror"):
        clip_files.parse_clip_model("ViT-B-32:s3://bucket/ckpt.bin")


def test_real_checkpoints_resolve_to_the_libraries_caches():
    wf = clip_files.clip_checkpoint("ViT-B-32", "openai")
    assert wf.location == "hf:timm/vit_base_patch32_clip_224.openai/open_clip_pytorch_model.bin"
    assert wf.url.startswith("https://huggingface.co/timm/vit_base_patch32_clip_224.openai/")
    assert "models--timm--vit_base_patch32_clip_224.openai" in str(wf.path())
    with pytest.raises(ValueError, match="known:"):
        clip_files.clip_checkpoint("ViT-B-32", "no-such-tag")


def test_shapes_and_ranges(prior):
    assert prior.backend == "clip" and prior.model == TINY  # default prompts: no suffix
    for x in (_images(), _images(3, 64, 48), _images(2, 20, 90)):
        s = prior.score(x)
        for t in (s.visibility, s.blur):
            assert t.shape == (x.shape[0],) and t.dtype == torch.float32
            assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()
    grey = prior.score(_images(2).mean(1, keepdim=True))
    assert grey.visibility.shape == (2,)
    with pytest.raises(ValueError, match="batch"):
        prior.score(torch.rand(3, 8, 8))


def test_batch_of_8_equals_8_singles(prior):
    x = _images(8)
    batch = prior.score(x)
    singles = [prior.score(x[i:i + 1]) for i in range(8)]
    torch.testing.assert_close(batch.visibility, torch.cat([s.visibility for s in singles]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.blur, torch.cat([s.blur for s in singles]),
                               atol=1e-5, rtol=0)
    chunked = create_prior("clip", model=TINY, max_batch=3).score(x)  # split internally
    torch.testing.assert_close(chunked.visibility, batch.visibility, atol=1e-5, rtol=0)


def test_prompt_order_does_not_change_scores(tiny, prior):
    x = _images(4)
    reordered = create_prior("clip", model=tiny,
                             visibility_prompts=list(reversed(DEFAULT_CLIP_VISIBILITY_PROMPTS)),
                             blur_prompts=[DEFAULT_CLIP_BLUR_PROMPTS[i] for i in (2, 0, 3, 1)])
    a, b = prior.score(x), reordered.score(x)
    assert torch.equal(a.visibility, b.visibility) and torch.equal(a.blur, b.blur)
    assert reordered.model == prior.model
    custom = create_prior("clip", model=tiny, blur_prompts=[["a blurry photo.", "a sharp photo."]])
    assert custom.model.startswith(TINY + "+prompts-")  # another scale, another id
    assert not torch.equal(custom.score(x).blur, a.blur)


def test_scores_are_the_clip_iqa_formula(tiny, prior):
    """v = mean over pairs of softmax(100 cos)[positive], computed here by hand."""
    import open_clip

    from varlide.priors.clip import load_clip, preprocess

    loaded = load_clip(tiny)
    model, tok = loaded.model, open_clip.get_tokenizer(TINY_ARCH)
    x = _images(3)
    with torch.no_grad():
        f = F.normalize(model.encode_image(preprocess(x, loaded.preprocess)), dim=-1)
        scale = min(100.0, float(model.logit_scale.exp()))

        def attr(pairs):
            ps = []
            for pos, neg in pairs:
                t = F.normalize(model.encode_text(tok([pos, neg])), dim=-1)
                ps.append((scale * f @ t.T).softmax(-1)[:, 0])
            return torch.stack(ps).mean(0)

        v, b = attr(DEFAULT_CLIP_VISIBILITY_PROMPTS), attr(DEFAULT_CLIP_BLUR_PROMPTS)
    s = prior.score(x)
    torch.testing.assert_close(s.visibility, v, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.blur, b, atol=1e-5, rtol=0)


def test_preprocess_follows_the_model(prior):
    from varlide.priors.clip import Preprocess, preprocess

    assert prior.pre.size == (32, 32) and prior.pre.resize_mode == "shortest"
    x = torch.zeros(1, 3, 40, 80)
    x[..., 20:] = 1.0
    out = preprocess(x, prior.pre)
    assert out.shape == (1, 3, 32, 32)  # short side to 32, centre crop of the width
    squash = preprocess(x, Preprocess((32, 32), (0, 0, 0), (1, 1, 1), "squash"))
    pad = preprocess(x, Preprocess((32, 32), (0, 0, 0), (1, 1, 1), "longest"))
    assert squash.shape == pad.shape == (1, 3, 32, 32)
    assert pad[..., :8, :].abs().sum() == 0  # letterbox rows are the fill value


def test_one_model_per_process_and_device(tiny, prior):
    again = create_prior("clip", model=tiny, blur_prompts=[["blurry", "sharp"]])
    assert again.net is prior.net  # the text embeddings differ, the model is shared


def test_file_and_local_dir_checkpoints_load_the_same(tiny, prior, tmp_path):
    ckpt = clip_files.clip_checkpoint(TINY_ARCH, TINY_TAG).path()
    by_file = create_prior("clip", model=f"{TINY_ARCH}:{ckpt}")
    assert by_file.model == f"{TINY_ARCH}:{ckpt.name}"
    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    (folder / "open_clip_model.safetensors").write_bytes(ckpt.read_bytes())
    by_dir = create_prior("clip", model=f"local-dir:{folder}")
    x = _images(3)
    ref = prior.score(x)
    for other in (by_file, by_dir):
        torch.testing.assert_close(other.score(x).visibility, ref.visibility, atol=1e-6, rtol=0)


def test_missing_checkpoint_names_file_and_command(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "empty"))
    clip_files.register_clip_checkpoint("varlide-tiny-test", "absent", url="https://example.invalid/x")
    with pytest.raises(weights.WeightsMissingError) as err:
        create_prior("clip", model="varlide-tiny-test:absent")
    msg = str(err.value)
    assert str(tmp_path / "empty" / "clip" / "varlide-tiny-test" / "absent") in msg
    assert "varlide weights pull" in msg and "prior clip varlide-tiny-test:absent" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_close_to_fp32(tiny, prior):
    gpu = create_prior("clip", model=tiny, device="cuda")
    assert gpu.autocast_dtype == torch.bfloat16
    x = _images(8)
    s = gpu.score(x.cuda())
    assert s.visibility.device.type == "cuda"
    torch.testing.assert_close(s.visibility.cpu(), prior.score(x).visibility, atol=2e-2, rtol=0)
