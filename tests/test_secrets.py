"""No credential value in logs, MLflow params/tags, manifests, Prefect parameters or Parquet.

The run is real: ``varlide enhance`` as a subprocess, its ``--reference`` on an FTP server
on 127.0.0.1 that needs the password (so the credentials must reach the filesystem), the
tracking URI of a real ``mlflow server`` given as ``http://user:secret@127.0.0.1:PORT``, a
secret in ``AWS_SECRET_ACCESS_KEY``, Prefect the session's test harness.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port, make_rgb
from PIL import Image

from varlide.storage.uri import (
    HiddenCredentialsError,
    hide_credentials,
    reveal_credentials,
)

FTP_PASSWORD = "ftp-pw-Zq81x"
TRACKING_PASSWORD = "mlflow-pw-Kd27v"
AWS_SECRET = "aws-secret-Ty93m"
SECRETS = (FTP_PASSWORD, TRACKING_PASSWORD, AWS_SECRET)


def _png(path: Path, seed: int, scale: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(make_rgb(24, 32, seed=seed, scale=scale)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


@pytest.fixture
def ftp_reference(tmp_path):
    """An FTP server on loopback serving the clean images; only ``alice`` + password."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import ThreadedFTPServer

    root = tmp_path / "ftp-root"
    for i in range(3):
        _png(root / "ref" / "cam" / f"{i:02d}.png", i, 1.0)
    authorizer = DummyAuthorizer()
    authorizer.add_user("alice", FTP_PASSWORD, str(root), perm="elr")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    server = ThreadedFTPServer(("127.0.0.1", 0), handler)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.2},
                              daemon=True)
    thread.start()
    try:
        yield f"ftp://alice:{FTP_PASSWORD}@127.0.0.1:{port}/ref", port
    finally:
        server.close_all()
        thread.join(5)


@pytest.fixture
def mlflow_http(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "mlartifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(0.5)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_hide_and_reveal_credentials(monkeypatch):
    monkeypatch.delenv("VARLIDE_URI_CREDENTIALS", raising=False)
    hidden = hide_credentials("ftp://bob:pw%40x@host:21/a/b")
    assert hidden == "ftp://***@host:21/a/b"
    assert reveal_credentials(hidden) == "ftp://bob:pw%40x@host:21/a/b"
    assert hide_credentials(hidden) == hidden  # idempotent
    for plain in ("s3://bucket/x", "/local/path", "memory://x"):
        assert hide_credentials(plain) == plain == reveal_credentials(plain)
    with pytest.raises(HiddenCredentialsError, match="not known"):
        reveal_credentials("ftp://***@other:21/x")


@pytest.mark.slow
def test_no_secret_reaches_outputs_logs_mlflow_or_prefect(tmp_path, ftp_reference, mlflow_http,
                                                          prefect_harness):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    reference, _ftp_port = ftp_reference
    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    for i in range(3):
        _png(inp / "cam" / f"{i:02d}.png", i, 0.2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "MLFLOW_TRACKING_URI": f"http://alice:{TRACKING_PASSWORD}@127.0.0.1:{mlflow_http}",
           "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "ph")}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "varlide.cli", "--verbose", "enhance", str(inp), str(out),
           "--enhancer", "classic-curve", "--metrics", "brightness", "--device", "cpu",
           "--no-progress", "--reference", reference]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = r.stdout + r.stderr
    assert "View run" in printed or "mlflow" in printed.lower()

    # the reference was really read through FTP with the password: PSNR against it
    rows = [row for f in sorted((out / "scores").rglob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows)
    assert all(row["q_psnr_out"] is not None for row in rows), rows[0]

    texts = {"stdout/stderr": printed}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".parquet"):
            texts[str(path)] = path.read_bytes().decode("latin-1")
    manifest = json.loads(next(out.glob("runs/*/manifest.json")).read_text())
    assert manifest["config"]["reference"].startswith("ftp://***@127.0.0.1:")

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_http}")
    runs = [run for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id])]
    assert runs, "the run was not recorded on the MLflow server"
    for run in runs:
        texts[f"mlflow {run.info.run_id}"] = json.dumps(
            [run.data.params, run.data.tags, run.info.artifact_uri])
        for art in client.list_artifacts(run.info.run_id):
            if not art.is_dir and art.path.endswith((".json", ".txt", ".yaml")):
                local = client.download_artifacts(run.info.run_id, art.path, str(tmp_path))
                texts[f"artifact {art.path}"] = Path(local).read_text(errors="replace")

    import asyncio

    async def flow_parameters() -> list:
        async with get_client() as prefect:
            return [fr.parameters for fr in await prefect.read_flow_runs()]

    params = asyncio.run(flow_parameters())
    assert params, "no flow run on the Prefect harness"
    texts["prefect parameters"] = json.dumps(params, default=str)

    leaks = [(where, secret) for where, text in texts.items() for secret in SECRETS
             if secret in text]
    assert not leaks, leaks
