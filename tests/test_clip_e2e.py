"""The main job with ``prior: clip`` on the tiny open_clip model, end to end (Prefect test
harness, MLflow on SQLite, local folders): uncalibrated first (the classic-curve enhancer
was made for the analytic scale: a loud warning, recorded per row), then calibrated with
``varlide calibrate`` and re-run (the calibration found beside the weights and applied)."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from conftest import make_rgb
from PIL import Image
from test_clip_prior import TINY, install_tiny_clip

from varlide.cli import main
from varlide.config import Config
from varlide.priors.calibration import UNCALIBRATED, Calibration

pytestmark = pytest.mark.usefixtures("prefect_harness")

FAST = {"metrics": ["brightness", "entropy"], "retry_delay_s": 0, "progress": False,
        "decode_threads": 2}


def _corpus(root, n=4):
    root.mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_rgb(40 + 8 * (i % 2), 56, seed=i, scale=0.12 + 0.1 * i)).save(
            buf, "PNG")
        (root / f"cam/f{i}.png").parent.mkdir(exist_ok=True)
        (root / f"cam/f{i}.png").write_bytes(buf.getvalue())
    return str(root)


def _scores(out, run_id) -> pd.DataFrame:
    return pd.read_parquet(f"{out}/scores/night/{run_id}")


def test_main_job_with_clip_prior(tmp_path, mlflow_sqlite, monkeypatch):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    install_tiny_clip(tmp_path / "cache")
    from flows.enhance import run_enhance

    inp = _corpus(tmp_path / "night")
    out = str(tmp_path / "out")
    cfg = Config(**FAST, prior="clip", prior_model=TINY, shard_size=2, batch_size=2)
    summary = run_enhance(inp, out, cfg)
    assert summary["complete"] and summary["failed_shards"] == []
    df = _scores(out, summary["run_id"])
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    assert set(df["prior_backend"]) == {"clip"} and set(df["prior_model"]) == {TINY}
    assert df["visibility"].between(0, 1).all() and df["blur"].between(0, 1).all()
    assert set(df["prior_calibration"]) == {UNCALIBRATED + "analytic/analytic-v1"}
    assert df["enhanced_uri"].notna().all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("varlide-enhance")
    params = client.search_runs([exp.experiment_id])[0].data.params
    assert params["prior"] == "clip" and params["prior_model"] == TINY

    # calibrate onto the analytic scale, then a new run picks it up from the weights cache
    rc = main(["calibrate", inp, "--prior", "clip", "--prior-model", TINY])
    assert rc == 0
    cal_file = next((tmp_path / "cache" / "calibrations").glob("*.json"))
    cal = Calibration.load(cal_file)
    again = run_enhance(inp, out, cfg.model_copy(update={"run_id": "calibrated"}))
    dc = _scores(out, again["run_id"])
    assert set(dc["prior_calibration"]) == {cal.id}
    assert set(dc["prior_model"]) == {TINY}
    raw = df.set_index("rel_path").sort_index()
    mapped = dc.set_index("rel_path").sort_index()
    assert not (raw["visibility"] == mapped["visibility"]).all()  # scores were mapped
    # the map is monotone: the order of the frames by v is kept
    assert list(raw["visibility"].rank()) == list(mapped["visibility"].rank())

    # the dry run names the prior, its checkpoint and the calibration
    assert main(["enhance", inp, out, "--dry-run", "--prior", "clip", "--prior-model", TINY,
                 "--metrics", "brightness"]) == 0


def test_dry_run_names_a_missing_clip_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "empty"))
    inp = _corpus(tmp_path / "night", n=1)
    rc = main(["enhance", inp, str(tmp_path / "out"), "--dry-run", "--prior", "clip",
               "--metrics", "brightness"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "prior clip ViT-B-32:openai" in cap.err
    assert "models--timm--vit_base_patch32_clip_224.openai" in cap.err
    assert "varlide weights pull" in cap.err
