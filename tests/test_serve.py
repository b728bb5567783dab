"""`varlide serve` against a real `prefect server start` on loopback: the nightly retrain
deployment exists with its cron schedule, and a run triggered from it completes and moves
(or keeps) the champion alias as the gate decides."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_retrain import EVAL, NAME, TRAIN, make_store, tiny_weights

PREFECT = Path(sys.executable).parent / "prefect"


def _wait(proc, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; yields the env."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_KEY", None)
    log = tmp_path / "prefect-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait(proc, f"{api}/health", log, 180)
        yield env
    finally:
        _stop(proc)


def test_serve_schedules_and_runs_the_gated_retrain(prefect_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from varlide import registry_mlflow as registry

    _, out = make_store(tmp_path)
    shipped = tiny_weights(tmp_path / "shipped")
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"train": TRAIN, "evaluation": EVAL,
                                   "gate": {"margin": 0.0, "guards": {}}}))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**prefect_server, "MLFLOW_TRACKING_URI": tracking,
           "VARLIDE_WEIGHTS_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("VARLIDE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen(
            [sys.executable, "-m", "varlide.cli", "serve", str(out), "--dataset", "night",
             "--model-name", NAME, "--newest", "10", "--config", str(cfg),
             "--initial-weights", shipped, "--cron", "0 3 * * *", "--name", "nightly"],
            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            deadline = time.monotonic() + 180
            dep = None
            with get_client(sync_client=True) as client:
                while dep is None:
                    if serve.poll() is not None:
                        pytest.fail(f"varlide serve exited {serve.returncode}:\n"
                                    f"{log.read_text()[-3000:]}")
                    try:  # serve registers its deployments one by one: wait for all
                        client.read_deployment_by_name("varlide-enhance-job/on-demand")
                        client.read_deployment_by_name("varlide-eval/on-demand")
                        dep = client.read_deployment_by_name("varlide-retrain/nightly")
                    except Exception:
                        if time.monotonic() > deadline:
                            pytest.fail(f"no deployment after 180 s:\n{log.read_text()[-3000:]}")
                        time.sleep(1)
                assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
                assert dep.parameters["dataset"] == "night" and dep.parameters["newest"] == 10
                assert client.read_deployment_by_name("varlide-enhance-job/on-demand").name
                assert not client.read_deployment_by_name("varlide-eval/on-demand").schedules
            run = run_deployment("varlide-retrain/nightly", timeout=420)
            assert run.state.is_completed(), f"{run.state}:\n{log.read_text()[-4000:]}"
    finally:
        _stop(serve)
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("varlide-retrain")
    (mlrun,) = client.search_runs([exp.experiment_id])
    decision = mlrun.data.tags["varlide.gate.decision"]
    assert decision in ("promote", "keep")
    assert "champion/synthetic/psnr" in mlrun.data.metrics
    assert "candidate/synthetic/psnr" in mlrun.data.metrics
    gain = mlrun.data.metrics["improvement/synthetic/psnr"]
    assert decision == ("promote" if gain > 0 else "keep")
    champion = str(registry.get_alias(NAME).version)
    assert champion == ("2" if decision == "promote" else "1")
    assert mlrun.data.tags["varlide.champion_version_after"] == champion
