import pytest

from varlide.config import Config, ConfigError, load_config


def test_precedence_defaults_file_env_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("shard_size: 10\nworkers: 3\nmetrics: [brightness, entropy]\n")
    env = {"VARLIDE_SHARD_SIZE": "20", "VARLIDE_QUALITY": "70"}
    cfg = load_config(cfg_file, {"shard_size": 30, "workers": None}, environ=env)
    assert cfg.shard_size == 30  # flag beats env beats file
    assert cfg.quality == 70  # env beats default
    assert cfg.workers == 3  # file beats default; an unset flag (None) does not override
    assert cfg.metrics == ("brightness", "entropy")


def test_error_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="shard_size"):
        load_config(None, {"shard_size": 0}, environ={})
    with pytest.raises(ConfigError, match="format"):
        load_config(None, {"format": "gif"}, environ={})
    with pytest.raises(ConfigError, match="no_such_field"):
        load_config(None, {"no_such_field": 1}, environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})


def test_run_id_ignores_execution_fields_only():
    base = Config()
    same = Config(workers=8, device="cpu", batch_size=2, retries=5)
    other = Config(quality=50)
    assert base.run_id_for("/data/a") == same.run_id_for("/data/a")
    assert base.run_id_for("/data/a") != other.run_id_for("/data/a")
    assert base.run_id_for("/data/a") != base.run_id_for("/data/b")
    assert Config(run_id="mine").run_id_for("/data/a") == "mine"


def test_dataset_defaults_to_last_path_component():
    assert Config().dataset_for("s3://bucket/frames/night/") == "night"
    assert Config(dataset="x").dataset_for("/a/b") == "x"


def test_reference_adds_full_reference_metrics():
    assert "psnr" not in Config().quality_metric_names()
    assert Config(reference="/r").quality_metric_names()[-2:] == ("psnr", "ssim")


def test_enhancer_options_change_the_run_id():
    routed = Config(enhancer_options={"full_blur": 0.2})
    assert routed.run_id_for("/d") != Config().run_id_for("/d")
    assert routed.output_config()["enhancer_options"] == {"full_blur": 0.2}


def test_shipped_weights_are_part_of_a_default_run_id(monkeypatch):
    """An upgrade that changes the shipped weights (or their backbone slot) starts a new run
    rather than resuming into rows the old weights wrote; explicit weights do not need it."""
    from varlide import config as config_mod

    assert config_mod.shipped_weights_id("varlide-lite") is not None
    assert config_mod.shipped_weights_id("classic-curve") is None
    before = Config().run_id_for("/d")
    pinned = Config(enhancer_weights="/w").run_id_for("/d")
    no_enhance = Config(enhance=False).run_id_for("/d")
    monkeypatch.setattr(config_mod, "shipped_weights_id", lambda name: "0123456789ab")
    assert Config().run_id_for("/d") != before
    assert Config(enhancer_weights="/w").run_id_for("/d") == pinned
    assert Config(enhance=False).run_id_for("/d") == no_enhance


# ---- one loader for every settings section (train, gate, evaluation, eval)


def test_every_section_loads_through_the_one_loader(tmp_path):
    from varlide.config import load_settings
    from varlide.evaluation import EvalRunConfig
    from varlide.promotion import EvalConfig, GateConfig
    from varlide.training import TrainConfig

    doc = tmp_path / "retrain.yaml"
    doc.write_text("train:\n  steps: 40\n  crop: 48\ngate:\n  margin: 0.25\n"
                   "evaluation:\n  max_side: 96\n")
    env = {"VARLIDE_TRAIN_CROP": "64", "VARLIDE_GATE_MARGIN": "0.5"}
    train = load_settings(TrainConfig, doc, {"steps": 7}, section="train", environ=env)
    assert (train.steps, train.crop) == (7, 64)  # file < env < flags, strings coerced
    gate = load_settings(GateConfig, doc, {"margin": None}, section="gate", environ=env)
    assert gate.margin == 0.5  # a flag left unset (None) does not override
    assert load_settings(EvalConfig, doc, section="evaluation", environ={}).max_side == 96
    run = load_settings(EvalRunConfig, {"seeds": "3", "enhancers": ["classic-curve"]},
                        {"batch_size": 2}, env_prefix="VARLIDE_EVAL_",
                        environ={"VARLIDE_EVAL_MAX_SIDE": "128"})
    assert (run.seeds, run.enhancers, run.batch_size, run.max_side) == (
        3, ("classic-curve",), 2, 128)


@pytest.mark.parametrize("section, data, message", [
    ("train", {"train": {"steps": 0}}, "steps: expected >= 1"),
    ("train", {"train": {"stpes": 5}}, "train.stpes: not a field"),
    ("gate", {"gate": {"margin": "lots"}}, "gate.margin"),
])
def test_a_bad_section_value_names_the_field(section, data, message):
    from varlide.config import ConfigError, load_settings
    from varlide.promotion import GateConfig
    from varlide.training import TrainConfig

    cls = {"train": TrainConfig, "gate": GateConfig}[section]
    with pytest.raises(ConfigError, match=message):
        load_settings(cls, data, section=section, environ={})


def test_varlide_eval_and_train_read_their_config_file(tmp_path, capsys):
    from varlide.cli import main

    bad = tmp_path / "eval.yaml"
    bad.write_text("batch_size: 0\n")
    assert main(["eval", "synthetic", "--config", str(bad)]) == 2
    assert "batch_size: expected >= 1" in capsys.readouterr().err
    bad_train = tmp_path / "train.yaml"
    bad_train.write_text("crop: -3\n")
    assert main(["train", str(tmp_path), str(tmp_path / "o"), "--config", str(bad_train)]) == 2
    assert "crop" in capsys.readouterr().err
