"""One run against a real ``mlflow server`` on loopback: SQLite backend, artifacts on S3 (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def mlflow_server(tmp_path, s3_bucket, monkeypatch):
    port = free_port()
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"{s3_bucket}/mlartifacts", "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 120 s")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    yield url, s3_bucket
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_run_recorded_on_server_with_artifacts_on_s3(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.enhance import run_enhance
    from varlide.config import Config
    from varlide.demo import make_demo_corpus
    from varlide.storage.uri import filesystem

    url, bucket = mlflow_server
    corpus = tmp_path / "demo"
    make_demo_corpus(str(corpus), count=3, size=(64, 48), seed=1)
    cfg = Config(metrics=["brightness", "entropy"], progress=False, retry_delay_s=0)
    summary = run_enhance(str(corpus / "lowlight"), str(tmp_path / "out"), cfg)
    assert summary["complete"]

    client = MlflowClient(url)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["images"] == 3 and run.data.tags["varlide.run_id"] == summary["run_id"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "manifest.json"} <= names
    # the artifact bytes live in the S3 bucket behind the server
    fs, path = filesystem(f"{bucket}/mlartifacts")
    stored = [p for p in fs.find(path) if p.endswith("summary.json")]
    assert len(stored) == 1
    assert json.loads(fs.cat_file(stored[0]))["run_id"] == summary["run_id"]
