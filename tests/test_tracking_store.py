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
