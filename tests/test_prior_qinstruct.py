"""The ``qinstruct`` prior on a tiny random LLaVA written in the ORIGINAL LLaVA layout.

The test builds a tiny transformers ``LlavaForConditionalGeneration`` (CLIP tower 28 px,
patch 14; a 2-layer LLaMA with 6500 tokens, so ids 1781/6460 exist), writes it the way the
Q-Instruct repo and CLIP-L/336 are published (two ``pytorch_model-0000x-of-00002.bin`` shards
with their index, old buffers, a CLIPModel tower file with text keys in ``vision_tower/``),
plus a WordLevel tokenizer whose "good"/"poor" sit at 1781/6460. The backend converts and
loads it; its scores are checked against transformers' own forward on each unpadded prompt.
No download: everything is made here.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from varlide.priors import PRIORS, create_prior  # noqa: E402
from varlide.priors import llava_convert as lc  # noqa: E402
from varlide.priors import qinstruct as qi  # noqa: E402
from varlide.priors import qinstruct_files as qf  # noqa: E402
from varlide.priors.base import ModelCache  # noqa: E402
from varlide.priors.clip import Preprocess, preprocess  # noqa: E402
from varlide.weights import WeightsMissingError  # noqa: E402

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the human's questions.")
QUERIES = [  # GPP-LLIE eval_llie_{global,local}.py --query, --query1, --query2
    "Visibility refers to the clarity and distinctness with which details of an image can be "
    "seen and recognized. Rate the visibility of the image.",
    "Contrast refers to the difference in luminance or color that makes an object "
    "distinguishable from others within an image. Rate the contrast of the image.",
    "Sharpness refers to the clarity of detail and the edge definition in an image. Rate the "
    "sharpness of the image.",
]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VOCAB, IMAGE_ID, SIZE, PATCH = 6500, 6499, 28, 14
N_IMAGE = (SIZE // PATCH) ** 2
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "image_size": SIZE, "patch_size": PATCH,
          "projection_dim": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.2}


def conversation(query: str) -> str:
    return f"{SYSTEM} USER: <image>\n{query} ASSISTANT:"


def tiny_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                      image_token_index=IMAGE_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Llava(cfg).eval()
        with torch.no_grad():  # a visible spread of good - poor (random init is near 0)
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.2)
    return model


def tiny_tokenizer():
    """A WordLevel tokenizer over the prompts' words, BOS added, good/poor at 1781/6460."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    texts = [part for q in QUERIES for part in conversation(q).split("<image>")]
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)},
             "good": 1781, "poor": 6460}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def original_config() -> dict:
    """config.json as the LLaVA code base writes it (LlamaConfig fields + mm_*)."""
    return {**TEXT, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
            "tie_word_embeddings": False, "torch_dtype": "float32", "use_mm_proj": True}


def write_original(model, tokenizer, folder: Path) -> None:
    """The original layout: 2 shards + index, an old rotary buffer, a CLIPModel tower."""
    llava, tower = lc.to_original(model.state_dict())
    llava = dict(llava)
    llava["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tower = {**tower, "vision_model.embeddings.position_ids": torch.arange(N_IMAGE + 1)[None],
             "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
             "text_projection.weight": torch.zeros(8, 8), "logit_scale": torch.tensor(4.6)}
    folder.mkdir(parents=True)
    keys = sorted(llava)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, names in shards.items():
        torch.save({k: llava[k].clone() for k in names}, folder / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(original_config()))
    tokenizer.save_pretrained(folder)
    (folder / "vision_tower").mkdir()
    torch.save({k: v.clone() for k, v in tower.items()}, folder / "vision_tower" /
               "pytorch_model.bin")
    clip_cfg = {"model_type": "clip", "vision_config": VISION,
                "text_config": {"hidden_size": 8}, "projection_dim": 16}
    (folder / "vision_tower" / "config.json").write_text(json.dumps(clip_cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qinstruct")
    model, tokenizer = tiny_model(), tiny_tokenizer()
    write_original(model, tokenizer, root / "llava")
    yield {"model": model, "tokenizer": tokenizer, "root": root, "folder": root / "llava"}
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def prior(tiny):
    return create_prior("qinstruct", device="cpu", model=str(tiny["folder"]))


def images(n: int, h: int = 32, w: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


@torch.no_grad()
def hand_scores(model, tokenizer, image: torch.Tensor) -> list[float]:
    """transformers' own forward on each prompt alone (no padding), GPP-LLIE's formula."""
    pixels = preprocess(image[None], Preprocess((SIZE, SIZE), MEAN, STD))
    out = []
    for query in QUERIES:
        before, after = conversation(query).split("<image>")
        ids = tokenizer(before).input_ids + [IMAGE_ID] * N_IMAGE + tokenizer(after).input_ids[1:]
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
        good, poor = logits[1781].item(), logits[6460].item()
        out.append(1 / (1 + math.exp((poor - good) / 3)))
    return out


def test_registered_lazily_and_module_data():
    assert "qinstruct" in PRIORS.names()
    assert PRIORS.info("qinstruct")["files"] is qf.prior_files
    assert [qi.PROMPTS[n] for n in qi.PROMPT_NAMES] == QUERIES
    assert (qi.GOOD_TOKEN, qi.POOR_TOKEN, qi.TEMPERATURE) == (1781, 6460, 3.0)
    assert qi.conversation("Q") == f"{SYSTEM} USER: <image>\nQ ASSISTANT:"
    code = "import sys, varlide.priors; print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "False"


def test_scores_in_unit_interval_and_vary(tiny, prior):
    s = prior.score(images(4))
    for t in (s.visibility, s.blur):
        assert t.shape == (4,) and t.dtype == torch.float32
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()
    raw = prior.attribute_scores(images(4))
    assert raw.shape == (4, 3) and raw.std(dim=0).min() > 1e-3  # the image matters
    assert prior.backend == "qinstruct"
    assert prior.model.startswith("folder:llava@") and len(prior.model.split("@")[1]) == 8
    assert qf.prior_files(str(tiny["folder"]))[0] == prior.model  # what run_scale predicts


def test_scores_equal_the_formula_by_hand(tiny, prior):
    x = images(3)
    raw = prior.attribute_scores(x)
    s = prior.score(x)
    for i in range(3):
        vis, con, sharp = hand_scores(tiny["model"], tiny["tokenizer"], x[i])
        assert raw[i].tolist() == pytest.approx([vis, con, sharp], abs=1e-5)
        assert s.visibility[i].item() == pytest.approx((vis + con) / 2, abs=1e-5)
        assert s.blur[i].item() == pytest.approx(1 - sharp, abs=1e-5)


def test_batch_equals_one_at_a_time(tiny):
    x = images(5, seed=3)
    chunked = create_prior("qinstruct", model=str(tiny["folder"]), max_batch=2)
    whole = create_prior("qinstruct", model=str(tiny["folder"]), max_batch=16)
    batch = whole.attribute_scores(x)
    single = torch.cat([whole.attribute_scores(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.attribute_scores(x), batch, atol=1e-5, rtol=0)
    assert chunked.net is whole.net  # one model per process and device


def test_local_map(tiny, prior):
    x = images(2, h=32, w=40, seed=5)
    local = prior.score_local(x)
    assert local.shape == (2, 3, 4, 4) and local.dtype == torch.float32
    assert (local >= 0).all() and (local <= 1).all()
    assert qi.grid_bounds(30) == [(0, 8), (8, 16), (16, 24), (24, 30)]  # padded to 32
    # cell (1, 2) of image 1: rows 8:16 (32 / 4), columns 20:30 (40 / 4)
    expect = hand_scores(tiny["model"], tiny["tokenizer"], x[1, :, 8:16, 20:30])
    assert local[1, :, 1, 2].tolist() == pytest.approx(expect, abs=1e-5)


def test_missing_files_are_named(tiny, tmp_path):
    folder = tmp_path / "no-tower"
    shutil.copytree(tiny["folder"], folder)
    shutil.rmtree(folder / "vision_tower")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(WeightsMissingError) as err:
        create_prior("qinstruct", model=str(folder))
    msg = str(err.value)
    for name in ("vision_tower/config.json", "vision_tower/pytorch_model.bin",
                 "pytorch_model-00002-of-00002.bin"):
        assert name in msg
    assert "pytorch_model-00001-of-00002.bin" not in msg
    label, files = qf.prior_files(f"local-dir:{folder}")
    assert label == "folder:no-tower"
    assert sorted(str(f.path().relative_to(folder)) for f in files) == sorted([
        "config.json", "tokenizer_config.json", "tokenizer.json", "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "vision_tower/config.json", "vision_tower/pytorch_model.bin"])


def test_hub_table_and_loading_from_the_hub_cache(tiny, tmp_path, monkeypatch):
    label, files = qf.prior_files(None)
    assert label == qf.DEFAULT_QINSTRUCT_MODEL
    locs = [f.location for f in files]
    repo, clip = qf.DEFAULT_QINSTRUCT_MODEL, qf.CLIP_L336
    assert f"hf:{repo}/pytorch_model-00002-of-00002.bin" in locs
    assert f"hf:{repo}/tokenizer.model" in locs and f"hf:{clip}/pytorch_model.bin" in locs
    assert all(f.url.startswith("https://huggingface.co/") for f in files)
    with pytest.raises(ValueError, match="local folder"):
        qf.parse_qinstruct_model("someone/other-llava")
    # the tiny files under the default repo names in a private hub cache (the tiny
    # tokenizer is a tokenizer.json: tokenizer.model and the special tokens map are stand-ins)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    stand_ins = {"tokenizer.model": b"stand-in", "special_tokens_map.json": json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}).encode()}
    for f in files:
        rel = f.location.split("/", 2)[2]
        tower = f.location.startswith(f"hf:{clip}/")
        dst = f.path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in stand_ins and not tower:
            dst.write_bytes(stand_ins[rel])
        else:
            shutil.copy(tiny["folder"] / ("vision_tower" if tower else "") / rel, dst)
    shutil.copy(tiny["folder"] / "tokenizer.json", files[0].path().parent / "tokenizer.json")
    monkeypatch.setattr(qi, "_MODELS", ModelCache())
    hub = create_prior("qinstruct", model=None)
    assert hub.model == qf.DEFAULT_QINSTRUCT_MODEL
    x = images(2, seed=7)
    ref = create_prior("qinstruct", model=str(tiny["folder"]))
    torch.testing.assert_close(hub.attribute_scores(x), ref.attribute_scores(x), atol=1e-6,
                               rtol=0)


def test_transformers_layout_folder(tiny, prior, tmp_path):
    folder = tmp_path / "hf-layout"
    tiny["model"].save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    assert qf.folder_layout(folder) == "transformers"
    assert qf.folder_layout(tiny["folder"]) == "original"
    other = create_prior("qinstruct", model=str(folder))
    x = images(2, seed=9)
    torch.testing.assert_close(other.attribute_scores(x), prior.attribute_scores(x),
                               atol=1e-6, rtol=0)


def test_conversion_round_trip(tiny):
    folder = tiny["folder"]
    state = tiny["model"].state_dict()
    cfg, converted = lc.convert_original(folder, folder / "vision_tower")
    assert sorted(converted) == sorted(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.text_config.hidden_size == 32 and cfg.vision_config.image_size == SIZE
    assert cfg.image_seq_length == N_IMAGE and cfg.image_token_index == VOCAB - 1
    llava = lc.read_tensors(qf.weight_paths(folder))
    tower = lc.read_tensors(qf.weight_paths(folder / "vision_tower"))
    for layout in lc.LAYOUTS:  # every known layout: there and back
        mapped = lc.convert_state_dict(llava, tower, layout)
        assert lc.detect_layout(mapped) == layout
        back_llava, back_tower = lc.to_original(mapped)
        assert set(back_llava) == {k for k in llava if not k.endswith("inv_freq")}
        assert set(back_tower) == {k for k in tower if k.startswith("vision_model.")
                                   and not k.endswith("position_ids")}
        assert all(torch.equal(back_llava[k], llava[k]) for k in back_llava)
    assert lc.installed_layout().name == "transformers-5"
    with pytest.raises(ValueError, match="model.image_newline"):
        lc.convert_state_dict({**llava, "model.image_newline": torch.zeros(2)}, tower)


def test_unsupported_configs_are_refused():
    tower = {"vision_config": VISION}
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        lc.llava_config({**original_config(), "mm_projector_type": "linear"}, tower)
    with pytest.raises(ValueError, match="im_start_end"):
        lc.llava_config({**original_config(), "mm_use_im_start_end": True}, tower)
    with pytest.raises(ValueError, match="mm_hidden_size"):
        lc.llava_config({**original_config(), "mm_hidden_size": 64}, tower)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert qi.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="int8 needs a CUDA"):
        qi.resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match="precision must be"):
        qi.resolve_precision("int4", cpu)


def test_preprocess_matches_the_clip_processor():
    """Our on-device pre-processing against transformers' CLIPImageProcessor (PIL): the same
    resize, crop and normalisation up to uint8 rounding and the resampler's kernel."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    h, w = 42, 60
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([xx, yy, (xx + yy) / 2])  # smooth: kernels barely differ
    ours = preprocess(x[None], Preprocess((SIZE, SIZE), MEAN, STD))[0]
    pil = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    proc = CLIPImageProcessor(size={"shortest_edge": SIZE},
                              crop_size={"height": SIZE, "width": SIZE})
    theirs = torch.as_tensor(proc(images=pil, return_tensors="pt")["pixel_values"][0])
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() < 0.04  # a flipped or shifted crop: > 1


def test_prompt_ids_of_a_sentencepiece_tokenizer_as_llava(tmp_path):
    """The real repo ships only tokenizer.model (LlamaTokenizer): the ids we feed must be
    LLaVA's tokenizer_image_token ones, i.e. sentencepiece on each side of the image, one BOS
    (the "▁" before the image and "▁", "<0x0A>" after it included)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    text = "\n".join(part for q in QUERIES for part in conversation(q).split("<image>"))
    (tmp_path / "corpus.txt").write_text((text + "\n") * 20)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=300, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, minloglevel=2, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        add_dummy_prefix=True)  # LLaMA's tokenizer.model settings
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (tmp_path / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    batch = qi.build_prompt_batch(tokenizer, [qi.PROMPTS[n] for n in qi.PROMPT_NAMES], 4)
    for row, query in enumerate(QUERIES):
        before, after = conversation(query).split("<image>")
        expect = [1] + sp.encode(before) + [-1] * 4 + sp.encode(after)
        real = batch.mask[row].bool()
        got = torch.where(batch.image[row], -1, batch.ids[row])[real].tolist()
        assert got == expect
        assert sp.id_to_piece(expect[len(sp.encode(before)) + 5]) == "▁"  # then <0x0A>


@pytest.mark.usefixtures("prefect_harness")
def test_main_job_with_local_maps_then_calibrated(tiny, tmp_path, mlflow_sqlite, monkeypatch):
    """``varlide enhance --prior qinstruct --prior-local``: rows carry v, b and the 3x4x4
    map; then ``varlide calibrate --prior qinstruct --to analytic`` and the calibrated
    re-run maps v and b (monotone) and keeps the maps."""
    import numpy as np
    import pandas as pd
    from conftest import make_rgb
    from PIL import Image

    from varlide.cli import main
    from varlide.priors.calibration import UNCALIBRATED, Calibration

    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    inp = tmp_path / "night"
    inp.mkdir()
    for i in range(4):
        Image.fromarray(make_rgb(36, 44, seed=i, scale=0.12 + 0.2 * i)).save(inp / f"f{i}.png")
    out = tmp_path / "out"
    common = ["--prior", "qinstruct", "--prior-model", str(tiny["folder"])]
    run = ["enhance", str(inp), str(out), *common, "--metrics", "brightness", "--no-progress",
           "--shard-size", "2", "--prior-local"]
    assert main([*run, "--run-id", "raw"]) == 0
    raw = pd.read_parquet(out / "scores" / "night" / "raw").set_index("rel_path").sort_index()
    assert len(raw) == 4 and set(raw["status"]) == {"ok"}
    prior = create_prior("qinstruct", model=str(tiny["folder"]))
    assert set(raw["prior_backend"]) == {"qinstruct"} and set(raw["prior_model"]) == {
        prior.model}
    assert set(raw["prior_calibration"]) == {UNCALIBRATED + "analytic/analytic-v1"}
    maps = np.stack(raw["prior_local"].to_numpy())
    assert maps.shape == (4, 3 * qi.GRID * qi.GRID) and ((maps >= 0) & (maps <= 1)).all()
    frame = np.asarray(Image.open(inp / "f1.png").convert("RGB"), np.float32) / 255
    want = prior.score_local(torch.from_numpy(frame).permute(2, 0, 1)[None])
    np.testing.assert_allclose(maps[1], want.flatten().numpy(), atol=1e-5)

    assert main(["calibrate", str(inp), *common, "--to", "analytic"]) == 0
    cal = Calibration.load(next((tmp_path / "cache" / "calibrations").glob("*.json")))
    assert main([*run, "--run-id", "calibrated"]) == 0
    mapped = pd.read_parquet(out / "scores" / "night" / "calibrated").set_index(
        "rel_path").sort_index()
    assert set(mapped["prior_calibration"]) == {cal.id}
    assert not (raw["visibility"] == mapped["visibility"]).all()
    assert list(raw["visibility"].rank()) == list(mapped["visibility"].rank())
    np.testing.assert_allclose(np.stack(mapped["prior_local"].to_numpy()), maps, atol=1e-6)


def test_prior_local_needs_a_backend_with_maps(tmp_path, capsys):
    from PIL import Image

    from varlide.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (16, 16)).save(inp / "a.png")
    code = main(["enhance", str(inp), str(tmp_path / "out"), "--dry-run", "--prior-local",
                 "--no-progress"])
    assert code == 2 and "the analytic prior has no local maps" in capsys.readouterr().err


@pytest.fixture
def local_probe():
    """An enhancer registered ``local_prior`` that keeps the maps it is handed (and returns
    its input): what an enhancer that wants GPP-LLIE's local prior receives."""
    from varlide.models.base import ENHANCERS, Enhancer, EnhanceResult

    seen: list[torch.Tensor] = []

    class Probe(Enhancer):
        name = "local-probe"

        @torch.no_grad()
        def enhance(self, images, visibility, blur, local=None):
            seen.append(local.detach().cpu().clone())
            return EnhanceResult(images=images.float().clone(), route=["probe"] * len(images))

    ENHANCERS.register("local-probe", local_prior=True)(lambda weights=None, **kw: Probe())
    yield seen
    ENHANCERS._factories.pop("local-probe")
    ENHANCERS._info.pop("local-probe")


@pytest.mark.usefixtures("prefect_harness")
def test_an_enhancer_that_wants_local_maps_receives_them(tiny, local_probe, tmp_path,
                                                         mlflow_sqlite, monkeypatch, capsys):
    import numpy as np
    import pandas as pd
    from conftest import make_rgb
    from PIL import Image

    from varlide.cli import main
    from varlide.engine import clear_stage_cache

    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    clear_stage_cache()
    inp = tmp_path / "night"
    inp.mkdir()
    for i in range(3):
        Image.fromarray(make_rgb(32, 40, seed=i, scale=0.3)).save(inp / f"f{i}.png")
    args = ["enhance", str(inp), str(tmp_path / "out"), "--prior", "qinstruct",
            "--prior-model", str(tiny["folder"]), "--enhancer", "local-probe", "--metrics",
            "brightness", "--no-progress", "--run-id", "probe"]
    assert main([*args, "--dry-run"]) == 2  # without --prior-local: refused up front
    assert "reads the prior's local maps" in capsys.readouterr().err
    assert main([*args, "--prior-local"]) == 0
    maps = torch.cat(local_probe)
    assert maps.shape == (3, 3, qi.GRID, qi.GRID)
    df = pd.read_parquet(tmp_path / "out" / "scores" / "night" / "probe")
    rows, got = np.stack(df["prior_local"].to_numpy()), maps.flatten(1).numpy()
    by_first = np.argsort(rows[:, 0]), np.argsort(got[:, 0])  # the same images, any order
    np.testing.assert_allclose(got[by_first[1]], rows[by_first[0]], atol=1e-6)
