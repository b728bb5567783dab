"""The MLflow store is one fixed place, whatever the working directory of a later step.

``sqlite:///mlflow.db`` (the default) was passed on relative, so SQLAlchemy opened
``mlflow.db`` of whatever directory a connection was made in: ``varlide report`` or a resume
from another directory silently used a new, empty store and started a new MLflow run.
"""

from __future__ import annotations

import os

import pytest

from varlide.tracking import RunTracker, tracking_uri


def test_relative_sqlite_uri_is_resolved_when_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db?timeout=5")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}?timeout=5"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default


@pytest.mark.parametrize("uri", ["sqlite:////srv/mlflow/mlflow.db", "sqlite:///:memory:",
                                 "http://mlflow:5000", "file:///srv/mlruns", "databricks"])
def test_other_uris_are_kept(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri() == uri


def test_tracking_uri_credentials_go_to_mlflow_variables(monkeypatch):
    """MLflow prints the tracking URI ("View run at ..."): its password must not be in it."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s%3Acret@mlflow:5000/base")
    assert tracking_uri() == "https://mlflow:5000/base"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s:cret"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow:5000/base"


def test_a_run_resumed_from_another_directory_finds_its_store(tmp_path, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    first = RunTracker("store-test", "run-a")
    first.finish(ok=True)
    recorded = tracking_uri()  # what a summary (and a manifest) names
    assert (start / "mlflow.db").is_file() and str(start / "mlflow.db") in recorded

    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", recorded)
    again = RunTracker("store-test", "run-a")
    assert again.resumed and again.mlflow_run_id == first.mlflow_run_id
    assert not (elsewhere / "mlflow.db").exists()


# ---- a run keeps logging to the store it started with; one MLflow run per output store


def _finished(inp, out):
    from tests.conftest import make_rgb
    from varlide.config import Config
    from varlide.engine import process_shard
    from varlide.run import prepare_run

    if not inp.exists():
        inp.mkdir(parents=True)
        from PIL import Image

        for i in range(3):
            Image.fromarray(make_rgb(24, 32, seed=i, scale=0.2)).save(inp / f"{i}.png")
    cfg = Config(enhancer="classic-curve", metrics=("brightness",), progress=False,
                 device="cpu", run_id="same-id")
    plan = prepare_run(str(inp), str(out), cfg)
    for shard in plan.pending:
        process_shard(plan.job(shard))
    return prepare_run(str(inp), str(out), cfg)


def test_resume_and_report_log_to_the_store_in_the_manifest(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from varlide.analysis import build_report
    from varlide.run import record_run
    from varlide.storage.runstore import RunStore

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default, relative store
    plan = _finished(tmp_path / "in", tmp_path / "out")
    manifest = RunStore(plan.output_uri, plan.run_id).read_manifest()
    assert manifest["mlflow_tracking_uri"] == f"sqlite:///{start / 'mlflow.db'}"
    first = record_run(plan, {})["mlflow"]

    monkeypatch.chdir(elsewhere)  # resumed and reported from another folder, no variable
    again = record_run(_finished(tmp_path / "in", tmp_path / "out"), {})["mlflow"]
    assert again["run_id"] == first["run_id"] and again["tracking_uri"] == first["tracking_uri"]
    report = build_report(str(tmp_path / "out"), plan.run_id)
    assert report.mlflow_run_id == first["run_id"]
    assert not (elsewhere / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=first["tracking_uri"])
    names = {a.path for a in client.list_artifacts(first["run_id"], "report")}
    assert "report/report.html" in names


def test_one_run_id_on_two_output_stores_is_two_mlflow_runs(tmp_path, mlflow_sqlite):
    from varlide.run import record_run

    a = record_run(_finished(tmp_path / "in", tmp_path / "out-a"), {})["mlflow"]
    b = record_run(_finished(tmp_path / "in", tmp_path / "out-b"), {})["mlflow"]
    assert a["run_id"] != b["run_id"]
    again = record_run(_finished(tmp_path / "in", tmp_path / "out-a"), {})["mlflow"]
    assert again["run_id"] == a["run_id"]


def test_a_recorded_store_is_used_unless_the_variable_says_otherwise(tmp_path, monkeypatch,
                                                                       caplog):
    recorded = f"sqlite:///{tmp_path / 'first.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(recorded) == recorded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with caplog.at_level("WARNING", logger="varlide.tracking"):
        assert tracking_uri(recorded) == f"sqlite:///{tmp_path / 'other.db'}"
    assert "first.db" in caplog.text and "other.db" in caplog.text
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri("postgresql://***@db/mlflow") == f"sqlite:///{os.getcwd()}/mlflow.db"
