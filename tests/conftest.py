"""Shared fixtures: real servers on loopback (moto S3), the shared data folder, small images."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VARLIDE_SHARED_DATA", REPO.parent / "shared" / "data"))
VARSR_LAYOUT = SHARED_DATA.parent / "reference" / "varsr_state_dict_layout.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip naming what is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (tests read real images there)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def varsr_layout() -> dict:
    """The released VARSR checkpoints' tensor names and shapes (../shared/reference), by
    checkpoint key, or a clean skip naming the missing file."""
    import json

    if not VARSR_LAYOUT.is_file():
        pytest.skip(f"{VARSR_LAYOUT} is absent (the layout of the released checkpoints)")
    return json.loads(VARSR_LAYOUT.read_text())


@pytest.fixture
def one_thread():
    """One torch thread for the test (small models: threads cost more than they give)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on 127.0.0.1, with the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; yields its ``s3://`` URI."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")
    name = name[:50].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


def make_rgb(h: int = 48, w: int = 64, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """A smooth random RGB image (uint8) with structure, darkened by ``scale``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([
        0.5 + 0.5 * np.sin(xx / (3 + 2 * c) + yy / (5 + c) + rng.uniform(0, 6)) for c in range(3)
    ], axis=-1)
    base = base * 0.8 + 0.2 * rng.random((h, w, 3))
    return np.clip(base * scale * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server on loopback) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch) -> str:
    """A local SQLite MLflow store for one test (artifacts beside it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    return uri


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory):
    """No test writes MLflow data into the working tree: a session-wide SQLite store unless a
    test sets its own (``mlflow_sqlite``, a real server)."""
    root = tmp_path_factory.mktemp("mlflow-session")
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    yield
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
