"""Retraining with a promotion gate: the gate, the registry (pyfunc + models:/ resolver),
the data selection, and the retrain flow end to end (tiny model, a few steps)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_rgb
from PIL import Image

from varlide import promotion
from varlide.models import files as model_files
from varlide.promotion import GateConfig, decide

TINY = {"width": 4, "vgpm_width": 4, "hidden": 4}
NAME = "varlide-lite-test"


def tiny_weights(folder, seed: int = 0) -> str:
    from varlide.models.varlide_lite import VarlideLite, VarlideLiteConfig

    torch.manual_seed(seed)
    VarlideLite(VarlideLiteConfig(**TINY)).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def registry_env(mlflow_sqlite, tmp_path, monkeypatch):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return mlflow_sqlite


# --------------------------------------------------------------------------- the gate


@pytest.mark.parametrize("cand_psnr, promote", [(20.75, True), (20.25, False), (20.5, False),
                                                 (19.0, False)])
def test_gate_promotes_only_beyond_the_margin(cand_psnr, promote):
    champ = {"synthetic/psnr": 20.0, "real/piqe": 40.0, "real/in_band": 0.5}
    cand = {**champ, "synthetic/psnr": cand_psnr}
    d = decide(champ, cand, GateConfig(margin=0.5))  # exactly the margin is not enough
    assert d.promote is promote, d.reason
    assert d.improvement["synthetic/psnr"] == pytest.approx(cand_psnr - 20.0)


def test_gate_directions_and_guards():
    champ = {"synthetic/psnr": 20.0, "real/piqe": 40.0, "real/in_band": 0.5}
    # piqe is lower-better: +5 piqe is a regression of 5 > tolerance 2
    d = decide(champ, {**champ, "synthetic/psnr": 21.0, "real/piqe": 45.0})
    assert not d.promote and "real/piqe" in d.reason and d.improvement["real/piqe"] == -5.0
    d = decide(champ, {**champ, "synthetic/psnr": 21.0, "real/piqe": 35.0})
    assert d.promote and d.improvement["real/piqe"] == 5.0
    # a lower-better primary measure
    g = GateConfig(primary="real/piqe", margin=1.0, guards={})
    assert decide(champ, {**champ, "real/piqe": 38.0}, g).promote
    assert not decide(champ, {**champ, "real/piqe": 39.5}, g).promote
    assert not decide(champ, {"real/piqe": 1.0}, GateConfig()).promote  # primary missing
    with pytest.raises(ValueError, match="margin"):
        GateConfig(margin=-1)


# --------------------------------------------------------------------------- data


def write_scores(out, dataset, run_id, rows):
    d = out / "scores" / dataset / run_id
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "run_id": pa.array([run_id] * len(rows), pa.string()),
        "dataset": pa.array([dataset] * len(rows), pa.string()),
        "rel_path": pa.array([r[0] for r in rows], pa.string()),
        "source_uri": pa.array([r[1] for r in rows], pa.string()),
        "status": pa.array([r[2] for r in rows], pa.string()),
        "processed_at": pa.array([r[3] for r in rows], pa.timestamp("us", tz="UTC")),
    })
    pq.write_table(table, d / "shard-00000.parquet")


def make_store(tmp_path, n_images: int = 10):
    """Images under tmp/frames and two runs' scores of dataset 'night' in tmp/out."""
    frames, out = tmp_path / "frames", tmp_path / "out"
    frames.mkdir()
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    old, new = [], []
    for i in range(n_images):
        scale = (0.3, 0.6, 0.9, 1.0)[i % 4]
        p = frames / f"img{i:02d}.png"
        Image.fromarray(make_rgb(48, 56, seed=i, scale=scale)).save(p)
        old.append((p.name, str(p), "ok", t0 + timedelta(minutes=i)))
        new.append((p.name, str(p), "ok", t0 + timedelta(days=1, minutes=i)))
    new.append(("broken.png", str(frames / "broken.png"), "error", t0 + timedelta(days=2)))
    write_scores(out, "night", "run-a", old)
    write_scores(out, "night", "run-b", new)
    write_scores(out, "other", "run-c", [("x.png", str(frames / "img00.png"), "ok",
                                          t0 + timedelta(days=3))])
    return frames, out


def test_newest_scored_images_and_staging(tmp_path):
    _, out = make_store(tmp_path)
    got = promotion.newest_scored_images(str(out), "night", 4)
    assert [g["rel_path"] for g in got] == ["img09.png", "img08.png", "img07.png", "img06.png"]
    assert all(g["run_id"] == "run-b" for g in got)  # newest row of each source, errors out
    assert len(promotion.newest_scored_images(str(out), "night", 100)) == 10  # one per source
    corpus = promotion.stage_corpus(got, str(tmp_path / "corpus"))
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == [
        "img06.png", "img07.png", "img08.png", "img09.png"]
    assert corpus == str(tmp_path / "corpus")
    with pytest.raises(FileNotFoundError, match="nothing"):
        promotion.newest_scored_images(str(out), "nothing", 4)


def test_finetune_config_continues_the_champion(tmp_path):
    w = tiny_weights(tmp_path / "w")
    f = promotion.finetune_config(w, {"steps": 3})
    assert f["model"]["width"] == 4 and f["init_from"] == w and f["steps"] == 3
    assert f["enhancer"] == "varlide-lite" and f["prior"] == "analytic"
    assert f["model"]["backbone"] == "identity" and f["final_backbone"] == "identity"
    # the shipped champion: trained with the slot empty, run with the denoiser -> the
    # candidate trains the same way and keeps the denoiser in its final config
    from varlide.models.varlide_lite import default_weights_dir

    f = promotion.finetune_config(str(default_weights_dir("varlide-lite")), {"steps": 3})
    assert f["model"]["backbone"] == "identity" and f["final_backbone"] == "denoise"
    assert f["model"]["vgpm"] is False


def test_gate_scores_the_models_not_the_router():
    """A weights folder loads with routing off, as `varlide eval` measures it."""
    from varlide.models.varlide_lite import default_weights_dir

    model = promotion._load(str(default_weights_dir("varlide-lite")), "cpu")
    assert model.skip_visibility is None and model.full_blur == 0.0
    x = torch.full((1, 3, 32, 32), 0.5)  # v in the default skip band: routed, it is skipped
    v, b = torch.tensor([0.92]), torch.tensor([0.1])
    out = model.enhance(x, v, b)
    assert out.route == ["curve"] and not torch.equal(out.images, x)


def test_training_starts_from_init_weights(tmp_path):
    from varlide.models.varlide_lite import VarlideLite
    from varlide.training import TrainConfig, train

    frames, _ = make_store(tmp_path, n_images=4)
    w = tiny_weights(tmp_path / "w", seed=7)
    cfg = TrainConfig(**promotion.finetune_config(w, {**TRAIN, "steps": 1, "lr": 1e-12,
                                                      "val_fraction": 0.0}))
    r = train(str(frames), str(tmp_path / "t"), cfg)
    a, b = VarlideLite.from_pretrained(w).state_dict(), VarlideLite.from_pretrained(
        r.weights_uri).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # lr ~0: still the init


# --------------------------------------------------------------------------- registry


def test_registry_pyfunc_and_models_uri(registry_env, tmp_path, capsys):
    import mlflow

    from varlide import registry_mlflow as registry
    from varlide.models import create_enhancer

    w = tiny_weights(tmp_path / "w")
    mv = registry.register_weights(w, NAME)
    assert str(mv.version) == "1" and registry.get_alias(NAME) is None
    registry.set_alias(NAME, mv.version)
    uri = f"models:/{NAME}@champion"
    assert registry.pin_model_uri(uri) == f"models:/{NAME}/1"
    model = mlflow.pyfunc.load_model(uri)
    x = np.random.default_rng(0).random((2, 24, 32, 3)).astype(np.float32)
    y = model.predict(x)
    assert y.shape == x.shape and np.isfinite(y).all()
    from varlide.resolver import local_weights  # models:/ is resolved above the models

    enh = create_enhancer("varlide-lite", weights=local_weights(uri))  # via the registry
    assert enh.weights_version == json.loads((tmp_path / "w" / "config.json").read_text())[
        "sha256"][:12]
    files = model_files.enhancer_files("varlide-lite", local_weights(uri))  # into the cache
    assert files and all(f.path().is_file() for f in files)
    assert str(tmp_path / "cache") in str(files[0].path())
    with pytest.raises(FileNotFoundError, match="not in the MLflow registry"):
        registry.resolve_model_uri(f"models:/{NAME}@nope")
    # `varlide enhance --weights models:/NAME@champion`: pinned to the version, resolved
    from varlide.cli import main

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(make_rgb(32, 32, seed=1, scale=0.3)).save(frames / "a.png")
    capsys.readouterr()
    assert main(["enhance", str(frames), str(tmp_path / "out"), "--enhancer", "varlide-lite",
                 "--weights", uri, "--dry-run"]) == 0
    got = capsys.readouterr()
    assert f"models:/{NAME}/1" in got.err and "[present]" in got.out
    assert "model.safetensors" in got.out and "MISSING" not in got.out
    # a deployment's flow run (no CLI) pins too: the plan names the version, not the alias
    from varlide.config import Config
    from varlide.run import prepare_run

    plan = prepare_run(str(frames), str(tmp_path / "out"),
                       Config(enhancer="varlide-lite", enhancer_weights=uri), write=False)
    assert plan.config.enhancer_weights == f"models:/{NAME}/1"
    assert plan.run_id == Config(enhancer="varlide-lite",
                                 enhancer_weights=f"models:/{NAME}/1").run_id_for(
        plan.input_uri)
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        registry.parse_model_uri("models:/justaname")


def test_gate_moves_the_alias_only_when_better(registry_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from varlide import registry_mlflow as registry
    from varlide.tracking import RunTracker

    registry.set_alias(NAME, registry.register_weights(tiny_weights(tmp_path / "v1"),
                                                       NAME).version)
    champ = {"synthetic/psnr": 20.0, "real/piqe": 40.0, "real/in_band": 0.5}

    def attempt(i, psnr):
        tracker = RunTracker("varlide-retrain", f"retrain-{i}")
        cand = tiny_weights(tmp_path / f"c{i}", seed=i)
        before = str(registry.get_alias(NAME).version)
        s = promotion.register_and_gate(cand, NAME, before, {
            "champion": champ, "candidate": {**champ, "synthetic/psnr": psnr},
            "input": {"synthetic/psnr": 15.0}}, GateConfig(margin=0.25), tracker)
        return s, MlflowClient().get_run(tracker.mlflow_run_id).data

    s, run = attempt(2, 21.0)  # better by 1 dB: promoted
    assert s["decision"] == "promote" and str(registry.get_alias(NAME).version) == "2"
    assert run.metrics["champion/synthetic/psnr"] == 20.0
    assert run.metrics["candidate/synthetic/psnr"] == 21.0
    assert run.metrics["gate/promote"] == 1.0 and run.metrics["improvement/synthetic/psnr"] == 1.0
    assert run.tags["varlide.gate.decision"] == "promote"
    assert run.tags["varlide.champion_version_after"] == "2"

    s, run = attempt(3, 20.2)  # within the margin: registered, alias stays
    assert s["decision"] == "keep" and s["candidate_version"] == "3"
    assert str(registry.get_alias(NAME).version) == "2"
    assert run.metrics["gate/promote"] == 0.0 and "margin" in run.tags["varlide.gate.reason"]

    s, run = attempt(4, 18.0)  # worse: stays
    assert s["decision"] == "keep" and str(registry.get_alias(NAME).version) == "2"
    assert run.metrics["candidate/synthetic/psnr"] == 18.0
    mv = registry.client().get_model_version(NAME, "4")
    assert mv.tags["gate.decision"] == "keep"


# --------------------------------------------------------------------------- the flow


TRAIN = dict(steps=3, batch_size=2, crop=32, val_crop=32, val_fraction=0.4, val_every=3,
             checkpoint_every=3, log_every=1, warmup=1, threads=1, prefetch=1, device="cpu")
EVAL = dict(max_side=64, paired_limit=4)


def test_retrain_flow_bootstraps_then_gates(prefect_harness, registry_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain_flow
    from varlide import registry_mlflow as registry

    _, out = make_store(tmp_path)
    shipped = tiny_weights(tmp_path / "shipped")
    # margin 0, no guards: the decision follows the sign of the psnr change (the gate tests
    # cover margins and guards)
    s = retrain_flow(str(out), "night", model_name=NAME, newest=10, train=TRAIN,
                     evaluation=EVAL, gate={"margin": 0.0, "guards": {}, "primary":
                                            "synthetic/psnr"},
                     initial_weights=shipped)
    assert s["bootstrapped"] and s["champion_version_before"] == "1"
    assert s["candidate_version"] == "2" and s["data"]["images"] == 10
    champ, cand = s["scores"]["champion"], s["scores"]["candidate"]
    assert {"synthetic/psnr", "real/piqe", "real/in_band"} <= set(champ) & set(cand)
    expected = "promote" if cand["synthetic/psnr"] - champ["synthetic/psnr"] > 0 else "keep"
    assert s["decision"] == expected
    assert str(registry.get_alias(NAME).version) == s["champion_version_after"]
    v1 = registry.client().get_model_version(NAME, "1")
    assert "bootstrap" in v1.tags[registry.TAG_SOURCE]
    run = MlflowClient().get_run(s["mlflow_run_id"]).data
    assert run.tags["varlide.gate.decision"] == expected
    assert run.metrics["champion/synthetic/psnr"] == pytest.approx(champ["synthetic/psnr"])
    assert run.metrics["candidate/synthetic/psnr"] == pytest.approx(cand["synthetic/psnr"])
    assert "train/loss" in run.metrics
    work = tmp_path / "out" / "retrain" / s["retrain_id"]
    assert not (work / "corpus").exists() and (work / "train" / "final" / "model.safetensors"
                                               ).is_file()


def test_cli_validates_retrain_configuration(tmp_path, capsys):
    from varlide.cli import main

    assert main(["retrain", str(tmp_path), "--dataset", "night", "--margin", "-1"]) == 2
    assert "gate" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 0\n")
    assert main(["retrain", str(tmp_path), "--dataset", "night", "--config", str(bad)]) == 2
    assert "steps" in capsys.readouterr().err
    bad.write_text("trian: {}\n")
    assert main(["serve", str(tmp_path), "--dataset", "night", "--config", str(bad)]) == 2
    assert "unknown section" in capsys.readouterr().err


def test_bootstrap_uses_the_retrained_enhancers_shipped_weights(registry_env, prefect_harness):
    """``--model-name night-lite``: the registry name is the user's; the first champion is
    the shipped weights of the enhancer being retrained (varlide/models/shipped/varlide-lite/)."""
    from prefect import flow

    from tasks.retrain import ensure_champion_task
    from varlide import registry_mlflow as registry
    from varlide.models.varlide_lite import default_weights_dir, weights_sha256
    from varlide.tracking import RunTracker

    run = RunTracker("varlide-retrain", "bootstrap-test")

    @flow
    def bootstrap() -> dict:
        return ensure_champion_task("night-lite", "champion", None, run.mlflow_run_id,
                                    "varlide-lite")

    assert bootstrap() == {"version": "1", "bootstrapped": True}
    folder = Path(registry.resolve_model_uri("models:/night-lite@champion"))
    if folder.is_file():
        folder = folder.parent
    shipped = default_weights_dir("varlide-lite") / "model.safetensors"
    assert weights_sha256((folder / "model.safetensors").read_bytes()) == \
        weights_sha256(shipped.read_bytes())
    assert bootstrap() == {"version": "1", "bootstrapped": False}
