"""The ``qrealign`` prior (Q-ReAlign, Qwen3.5-VL) on a tiny random model saved by the test."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.qwen3_5")

from vlm_helpers import save_tiny_qwen35  # noqa: E402

from varlide.priors.base import ModelCache, create_prior  # noqa: E402
from varlide.priors.qrealign import (  # noqa: E402
    ATTRIBUTES,
    LEVEL_WEIGHTS,
    LEVELS,
    QReAlignPrior,
    level_token_ids,
    load_qrealign,
)
from varlide.priors.qrealign_files import parse_qrealign_model, qrealign_files  # noqa: E402
from varlide.weights.files import WeightsMissingError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_qwen35(tmp_path_factory.mktemp("qrealign") / "tiny")


def _frames(n: int = 3, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """8-bit-valued frames (a PIL round trip is exact) of varied brightness."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).float()
    return (x * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)).round() / 255


def test_scores_follow_the_level_formula_from_the_models_logits(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = create_prior("qrealign", model=str(tiny))
    assert prior.backend == "qrealign" and prior.model.startswith("folder:tiny@")
    x = _frames()
    s = prior.attribute_scores(x)
    assert s.shape == (3, 3) and bool(((s >= 0) & (s <= 1)).all())
    # by hand: the processor's inputs for frame 1 and the sharpness prompt, the full
    # forward (all positions), the last position's level-word softmax times the weights
    loaded = prior.loaded
    proc, model = loaded.processor, loaded.model
    question, stem = ATTRIBUTES["sharpness"]
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    frame = (x[1] * 255).round().to(torch.uint8)
    inputs = proc(text=[text + stem], images=[frame], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    ids = level_token_ids(proc.tokenizer, LEVELS)
    p = logits[ids].float().softmax(-1)
    want = float((p * torch.tensor(LEVEL_WEIGHTS)).sum())
    assert float(s[1, 2]) == pytest.approx(want, abs=1e-6)
    scores = prior.score(x)
    torch.testing.assert_close(scores.visibility, s[:, :2].mean(1))
    torch.testing.assert_close(scores.blur, 1 - s[:, 2])
    assert float(scores.blur.std()) > 0  # the frames are told apart


def test_batch_equals_one_at_a_time(tiny):
    prior = QReAlignPrior(load_qrealign(str(tiny)), max_batch=4)
    x = _frames(n=3, seed=1)
    whole = prior.attribute_scores(x)
    single = torch.cat([prior.attribute_scores(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=0)


def test_the_quality_prompt_equals_pyiqas_qrealign(tiny):
    """Our batched path with Q-ReAlign's own prompt = pyiqa's one-image-at-a-time metric."""
    arch = pytest.importorskip("pyiqa.archs.qrealign_arch")
    theirs = arch.QReAlign(model=str(tiny), dtype=torch.float32)
    assert arch.LEVELS == list(LEVELS) and arch.WEIGHTS == list(LEVEL_WEIGHTS)
    ours = QReAlignPrior(load_qrealign(str(tiny)),
                         attributes={"quality": arch.TASKS["quality"]})
    x = _frames(n=2, seed=2)
    want = theirs(x).float()
    torch.testing.assert_close(ours.attribute_scores(x)[:, 0], want, atol=1e-6, rtol=0)
    assert float((want - want.flip(0)).abs().min()) > 1e-3  # the frames are told apart


def test_model_loaded_once_per_process(tiny):
    assert load_qrealign(str(tiny)) is load_qrealign(f"local-dir:{tiny}")


def test_missing_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsMissingError, match="model.safetensors"):
        create_prior("qrealign", model=str(empty))
    with pytest.raises(WeightsMissingError, match="Q-ReAlign-Mini-0.8B"):
        create_prior("qrealign")
    spec = parse_qrealign_model("lite")
    names = [f.location for f in qrealign_files(spec)]
    assert spec.path == "q-future/Q-ReAlign-Lite-4B" and all(
        n.startswith("hf:q-future/Q-ReAlign-Lite-4B/") for n in names)
    with pytest.raises(ValueError, match="knows the files of"):
        parse_qrealign_model("someone/else")


@pytest.mark.usefixtures("prefect_harness")
def test_main_job_then_calibrated_with_the_qrealign_prior(tiny, tmp_path, mlflow_sqlite,
                                                          monkeypatch):
    """``varlide enhance --prior qrealign``: uncalibrated (warned per row), then
    ``varlide calibrate --prior qrealign --to analytic`` and the calibrated re-run."""
    import pandas as pd
    from conftest import make_rgb
    from PIL import Image

    from varlide.cli import main
    from varlide.priors.calibration import UNCALIBRATED, Calibration

    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    inp = tmp_path / "night"
    inp.mkdir()
    for i in range(4):
        Image.fromarray(make_rgb(40, 56, seed=i, scale=0.12 + 0.2 * i)).save(inp / f"f{i}.png")
    out = tmp_path / "out"
    common = ["--prior", "qrealign", "--prior-model", str(tiny)]
    run = ["enhance", str(inp), str(out), *common, "--metrics", "brightness", "--no-progress",
           "--shard-size", "2"]
    assert main([*run, "--run-id", "raw"]) == 0
    raw = pd.read_parquet(out / "scores" / "night" / "raw").set_index("rel_path").sort_index()
    assert len(raw) == 4 and set(raw["status"]) == {"ok"}
    assert set(raw["prior_backend"]) == {"qrealign"}
    assert set(raw["prior_model"]) == {create_prior("qrealign", model=str(tiny)).model}
    assert raw["visibility"].between(0, 1).all() and raw["blur"].between(0, 1).all()
    assert set(raw["prior_calibration"]) == {UNCALIBRATED + "analytic/analytic-v1"}

    assert main(["calibrate", str(inp), *common, "--to", "analytic"]) == 0
    cal = Calibration.load(next((tmp_path / "cache" / "calibrations").glob("*.json")))
    assert main([*run, "--run-id", "calibrated"]) == 0
    mapped = pd.read_parquet(out / "scores" / "night" / "calibrated").set_index(
        "rel_path").sort_index()
    assert set(mapped["prior_calibration"]) == {cal.id}
    assert not (raw["visibility"] == mapped["visibility"]).all()  # the scores were mapped
    assert list(raw["visibility"].rank()) == list(mapped["visibility"].rank())  # monotone


@pytest.mark.parametrize("backend, repo", [("qrealign", "Q-ReAlign-Mini-0.8B"),
                                           ("qinstruct", "llava_v1.5_7b_qinstruct")])
def test_dry_run_names_the_missing_hub_files_and_the_command(backend, repo, tmp_path,
                                                             monkeypatch, capsys):
    from PIL import Image

    from varlide.cli import main

    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "empty"))
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (16, 16)).save(inp / "a.png")
    code = main(["enhance", str(inp), str(tmp_path / "out"), "--dry-run", "--prior", backend,
                 "--metrics", "brightness", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"prior {backend}" in err and repo in err
    assert "config.json" in err and "varlide weights pull" in err


def test_loads_from_the_hub_cache_under_the_tabled_names(tiny, tmp_path, monkeypatch):
    """The default model's files, as ``varlide weights pull`` leaves them in the hub cache
    (the tiny model under Q-ReAlign-Mini's names; its image processor in the older
    preprocessor_config.json form the table lists), load and score as the folder does."""
    import json
    import shutil

    from varlide.priors import qrealign as qr
    from varlide.priors.qrealign_files import DEFAULT_MODEL, prior_files

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    label, files = prior_files(None)
    assert label == DEFAULT_MODEL and all(f.url.startswith("https://huggingface.co/")
                                          for f in files)
    combined = json.loads((tiny / "processor_config.json").read_text())
    for f in files:
        name = f.location.rsplit("/", 1)[1]
        f.path().parent.mkdir(parents=True, exist_ok=True)
        if name == "preprocessor_config.json":
            f.path().write_text(json.dumps(combined["image_processor"]))
        else:
            shutil.copy(tiny / name, f.path())
    monkeypatch.setattr(qr, "_MODELS", ModelCache())
    hub = create_prior("qrealign")
    assert hub.model == DEFAULT_MODEL
    x = _frames(n=2, seed=3)
    ref = create_prior("qrealign", model=str(tiny))
    torch.testing.assert_close(hub.attribute_scores(x), ref.attribute_scores(x), atol=1e-6,
                               rtol=0)


def test_prior_options_reach_the_backend_and_unknown_ones_stop_the_run(tiny, tmp_path,
                                                                        capsys):
    import yaml
    from PIL import Image

    from varlide.cli import main
    from varlide.config import Config
    from varlide.priors.calibration import prior_for_run

    cfg = Config(prior="qrealign", prior_model=str(tiny), enhance=False,
                 prior_options={"max_batch": 1, "precision": "fp32"})
    prior = prior_for_run(cfg, None, "cpu")
    assert prior.inner.max_batch == 1 and prior.inner.loaded.dtype == torch.float32
    assert cfg.run_id_for("x") != cfg.model_copy(update={"prior_options": {}}).run_id_for("x")
    inp = tmp_path / "in"
    inp.mkdir()
    Image.new("RGB", (16, 16)).save(inp / "a.png")
    for prior_name, options, says in (
            ("analytic", {"precision": "bf16"}, "the analytic prior takes none"),
            ("qrealign", {"precison": "bf16"}, "takes ['max_batch', 'precision']")):
        doc = tmp_path / f"{prior_name}.yaml"
        doc.write_text(yaml.safe_dump({"prior": prior_name, "prior_model": None if
                                       prior_name == "analytic" else str(tiny),
                                       "prior_options": options}))
        code = main(["enhance", str(inp), str(tmp_path / "out"), "--dry-run", "--config",
                     str(doc), "--metrics", "brightness", "--no-progress"])
        assert code == 2 and says in capsys.readouterr().err
