"""`varlide eval`: the table of quality measures per enhancer, end to end on a tiny demo
corpus (real Prefect test harness, MLflow in the session's temporary SQLite store: a fresh
store per test would cost ~10 s of migrations each), and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from varlide.cli import main

COUNT = 4  # demo images 0..3: all of the small size (every 5th one is 256x256)
ENHANCERS = ["input", "classic-curve", "zero-dce", "varlide-lite"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from varlide.demo import make_demo_corpus

    root = tmp_path_factory.mktemp("demo")
    make_demo_corpus(str(root), count=COUNT, size=(80, 64), seed=0)
    return root


def _rows(table: str) -> list[list[str]]:
    """The body rows of a Markdown table (cells stripped)."""
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default --out lands here
    return tmp_path


def _mlflow_run(run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # conftest: a tmp SQLite file
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    return run, exp, {a.path for a in client.list_artifacts(run_id)}


def test_eval_with_reference(demo, tmp_path, in_tmp, prefect_harness, capsys):
    out = tmp_path / "eval-out"
    code = main(["eval", str(demo / "lowlight"), "--reference", str(demo / "reference"),
                 "--out", str(out), "--device", "cpu", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sets"] == [{"name": "lowlight", "kind": "paired", "images": COUNT}]
    # one row per enhancer on the set, input first, each over every image
    summary = pd.read_csv(out / "eval_summary.csv")
    assert list(summary["enhancer"]) == ENHANCERS
    assert set(summary["set"]) == {"lowlight"} and (summary["n"] == COUNT).all()
    assert {"psnr_mean", "psnr_std", "ssim_mean", "brightness_mean"} <= set(summary.columns)
    psnr = summary.set_index("enhancer")["psnr_mean"]
    assert psnr["classic-curve"] > psnr["input"] + 3  # a dark demo image gains several dB
    per = pd.read_csv(out / "eval_per_image.csv")
    assert len(per) == COUNT * len(ENHANCERS)
    assert {"set", "image", "enhancer", "route", "psnr", "ssim", "brightness"} <= set(per.columns)
    assert sorted(per.loc[per["enhancer"] == "input", "image"]) == [
        p.name for p in sorted((demo / "lowlight").iterdir())]
    # learned enhancers are measured with routing off: every image takes the full path
    # routing off: every image takes the whole model; the shipped weights are VICM only
    assert set(per.loc[per["enhancer"] == "varlide-lite", "route"]) == {"curve"}
    # the Markdown table: the same rows, headed with the directions
    table = (out / "eval.md").read_text()
    assert table == result["table"] and "psnr ↑" in table
    assert [(r[1], r[2]) for r in _rows(table)] == [(e, str(COUNT)) for e in ENHANCERS]
    # one MLflow run with the summary metrics and the files
    run, exp, artifacts = _mlflow_run(result["mlflow_run_id"])
    assert exp.name == "varlide-eval" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["lowlight/n"] == COUNT
    assert m["lowlight/classic-curve/psnr"] == pytest.approx(psnr["classic-curve"])
    assert m["lowlight/input/psnr"] == pytest.approx(psnr["input"])
    assert {f"lowlight/{e}/ssim" for e in ENHANCERS} <= set(m)
    assert {"eval_per_image.csv", "eval_summary.csv", "eval.md", "eval_plan.json"} <= artifacts
    assert run.data.tags["varlide.run_id"] == result["eval_id"]
    # and a Prefect table artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import _artifact_key

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[_artifact_key(result["eval_id"])])))
    assert [a.type for a in arts] == ["table"]
    data = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    assert [r["enhancer"] for r in data] == ENHANCERS


def test_eval_without_reference(demo, tmp_path, in_tmp, prefect_harness, capsys):
    code = main(["eval", str(demo / "lowlight"), "--enhancer", "classic-curve",
                 "--enhancer", "varlide-lite", "--max-images", "3", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = _rows(printed)
    assert [(r[1], r[2]) for r in rows] == [("input", "3"), ("classic-curve", "3"),
                                            ("varlide-lite", "3")]
    assert "piqe ↓" in printed and "psnr" not in printed
    # default --out: ./eval-<UTC time>-<hex> in the working directory (tmp_path here)
    (out,) = tmp_path.glob("eval-*")
    assert str(out) in printed
    summary = pd.read_csv(out / "eval_summary.csv")
    assert {"brightness_mean", "piqe_mean", "entropy_mean", "overexposed_mean",
            "sharpness_mean", "in_band_mean"} <= set(summary.columns)
    assert "psnr_mean" not in summary.columns
    overall = summary[summary["band"] == "all"]
    assert list(overall["enhancer"]) == ["input", "classic-curve", "varlide-lite"]
    assert (overall["n"] == 3).all() and (overall["kind"] == "unpaired").all()
    b = overall.set_index("enhancer")["brightness_mean"]
    assert b["classic-curve"] > b["input"]
    per = pd.read_csv(out / "eval_per_image.csv")
    assert len(per) == 3 * 3 and per["image"].nunique() == 3
    (run_id,) = [ln.split()[2] for ln in printed.splitlines() if ln.strip().startswith("mlflow")]
    run, _, artifacts = _mlflow_run(run_id)
    assert run.data.metrics["lowlight/classic-curve/piqe"] == pytest.approx(
        overall.set_index("enhancer")["piqe_mean"]["classic-curve"])
    assert "eval.md" in artifacts


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case, message", [
    ("missing-input", "not found"),
    ("missing-reference", "reference not found"),
    ("unmatched-reference", "no image of"),
    ("unknown-enhancer", "unknown enhancer 'retinex'"),
    ("bad-weights", "no learned parameters"),
    ("psnr-without-reference", "need(s) a reference"),
    ("unknown-metric", "unknown metric"),
    ("synthetic-with-reference", "makes its own references"),
    ("empty-folder", "no readable images"),
])
def test_eval_bad_input_exits_2(demo, tmp_path, capsys, case, message):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "unrelated.png")
    (tmp_path / "empty").mkdir()
    low, ref = str(demo / "lowlight"), str(demo / "reference")
    argv = {
        "missing-input": [str(tmp_path / "nope")],
        "missing-reference": [low, "--reference", str(tmp_path / "nope")],
        "unmatched-reference": [low, "--reference", str(other)],
        "unknown-enhancer": [low, "--enhancer", "retinex"],
        "bad-weights": [low, "--enhancer", f"classic-curve={tmp_path}"],
        "psnr-without-reference": [low, "--metrics", "psnr,brightness"],
        "unknown-metric": [low, "--reference", ref, "--metrics", "psnrr"],
        "synthetic-with-reference": ["synthetic", "--reference", ref],
        "empty-folder": [str(tmp_path / "empty")],
    }[case]
    assert main(["eval", *argv, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_plan_synthetic_and_enhancer_specs():
    from varlide import cli, evaluation

    assert cli.EVAL_ENHANCERS == evaluation.DEFAULT_ENHANCERS
    assert cli.EVAL_MAX_SIDE == evaluation.DEFAULT_MAX_SIDE
    plan = evaluation.plan_sets("synthetic", seeds=2, max_images=3, max_side=64)
    (s,) = evaluation.sets_from_plan(json.loads(json.dumps(plan)))  # JSON-able
    assert s.paired and s.name == "synthetic" and len(s) == 3
    assert s.items[0].load()[0].shape == (64, 64, 3)
    full = evaluation.sets_from_plan(evaluation.plan_sets("synthetic", seeds=2))[0]
    assert len(full) == 20 and full.items[0].load()[0].shape == (256, 256, 3)
    specs = evaluation.parse_enhancers(
        ["input", "classic-curve", "varlide-lite", "varlide-lite=/w/final"])
    assert specs == {"classic-curve": {"name": "classic-curve", "weights": None},
                     "varlide-lite": {"name": "varlide-lite", "weights": None},
                     "varlide-lite=/w/final": {"name": "varlide-lite", "weights": "/w/final"}}
    assert evaluation.parse_enhancers(["zero-dce"], {"zero-dce": "models:/z@champion"}) == {
        "zero-dce": {"name": "zero-dce", "weights": "models:/z@champion"}}
    with pytest.raises(ValueError, match="not evaluated"):
        evaluation.parse_enhancers(["zero-dce"], {"varlide-lite": "/w"})
    with pytest.raises(ValueError, match="twice"):
        evaluation.parse_enhancers(["zero-dce", "zero-dce"])
    model = evaluation.load_enhancer("varlide-lite")
    assert model.skip_visibility is None and model.full_blur == 0.0
