"""Distributed execution on a real Dask cluster (prefect-dask), on loopback.

A ``distributed.LocalCluster`` of 2 single-threaded worker processes, one of which advertises
a ``GPU`` resource (no CUDA needed: the resource is only a scheduling label). CPU shards run on
both, and the Parquet equals the thread runner's row for row (all but timings, worker and
processed_at; enhanced_uri compared below the output root); a worker killed mid-run still
leaves exactly one row per image; GPU-bound shards land only on the GPU worker; ``--dask
local:2`` through the CLI.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_rgb
from PIL import Image

from varlide.config import Config, ConfigError, load_config

distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

pytestmark = pytest.mark.usefixtures("prefect_harness")

FAST = {"metrics": ["brightness", "contrast", "entropy", "overexposed"], "retry_delay_s": 0,
        "progress": False, "decode_threads": 2, "device": "cpu"}
SLOW_BATCH_S = 1.0  # the test-slow enhancer's sleep per batch (a shard is one batch here)


# --------------------------------------------------------------------------- helpers


def _corpus(root: Path, n: int) -> list[str]:
    """n tiny (64x48) dark PNGs in two folders; their relative paths, sorted."""
    rels = []
    for i in range(n):
        rel = f"{'cam_a' if i % 2 else 'cam_b'}/frame_{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_rgb(48, 64, seed=i, scale=0.15)).save(root / rel)
        rels.append(rel)
    return sorted(rels)


def _scores(out: Path) -> pd.DataFrame:
    files = sorted(out.glob("scores/**/*.parquet"))
    assert files, "no Parquet written"
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return df.sort_values("rel_path", ignore_index=True)


def _run(inp: Path, out: Path, **overrides):
    from flows.enhance import run_enhance

    return run_enhance(str(inp), str(out), Config(**{**FAST, **overrides}))


def _worker_names(client) -> dict[str, str]:
    """{worker address: its ``worker`` column value (host:pid)}."""
    host = socket.gethostname()
    return {addr: f"{host}:{pid}" for addr, pid in client.run(os.getpid).items()}


def _warm() -> bool:
    import tasks.shards  # noqa: F401  (prefect, torch, the engine: imported before the run)

    return True


def _install_slow_enhancer() -> None:
    """``test-slow``: classic-curve that sleeps per batch, so a shard is in flight long."""
    from varlide.models.base import ENHANCERS
    from varlide.models.classic import ClassicCurve

    if "test-slow" in ENHANCERS:
        return

    class Slow(ClassicCurve):
        name = "test-slow"

        def enhance(self, images, visibility, blur):
            time.sleep(SLOW_BATCH_S)
            return super().enhance(images, visibility, blur)

    @ENHANCERS.register("test-slow")
    def _factory(weights=None, **kw):
        return Slow(**kw)


class _SlowEnhancerPlugin(distributed.WorkerPlugin):
    """Registers ``test-slow`` in every worker process, restarted ones included."""

    name = "varlide-test-slow-enhancer"

    def setup(self, worker):
        _install_slow_enhancer()


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes x 1 thread on 127.0.0.1, worker "gpu" with ``resources={"GPU": 1}``.

    Both specs are set before either starts, so the two processes spawn at once; warmed up
    (imports done) before the tests. Yields (cluster, client).
    """
    with distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as lc:
        gpu = copy.deepcopy(lc.new_spec)
        gpu.setdefault("options", {})["resources"] = {"GPU": 1}
        lc.worker_spec.update({"cpu": copy.deepcopy(lc.new_spec), "gpu": gpu})
        lc.loop.add_callback(lc._correct_state)
        # not the process's default client: prefect-dask would use it instead of the address
        with distributed.Client(lc, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=180)
            client.run(_warm)
            yield lc, client


# --------------------------------------------------------------------------- tests


def test_dask_rows_equal_thread_runner_and_use_both_workers(cluster, tmp_path, mlflow_sqlite):
    lc, client = cluster
    inp = tmp_path / "night"
    rels = _corpus(inp, n=8)
    threads = _run(inp, tmp_path / "threads", shard_size=2)
    dask = _run(inp, tmp_path / "dask", shard_size=2, dask=lc.scheduler_address)
    assert threads["run_id"] == dask["run_id"]  # the Dask address does not change outputs
    assert dask["complete"] and dask["failed_shards"] == []

    a, b = _scores(tmp_path / "threads"), _scores(tmp_path / "dask")
    assert list(b["rel_path"]) == rels
    workers = _worker_names(client)
    assert set(b["worker"]) == set(workers.values())  # the shards ran on both processes
    assert not set(b["worker"]) & set(a["worker"])
    markers = sorted((tmp_path / "dask" / "runs" / dask["run_id"] / "done").glob("*.json"))
    assert {json.loads(m.read_text())["worker"] for m in markers} == set(workers.values())

    for df, root in ((a, tmp_path / "threads"), (b, tmp_path / "dask")):
        prefix = str(root) + "/"
        assert df["enhanced_uri"].str.startswith(prefix).all()
        df["enhanced_uri"] = df["enhanced_uri"].str.removeprefix(prefix)
    skip = [c for c in a.columns if c.endswith("_ms")] + ["worker", "processed_at"]
    pd.testing.assert_frame_equal(a.drop(columns=skip), b.drop(columns=skip), check_exact=True)
    for uri in a["enhanced_uri"]:  # and the enhanced images, byte for byte
        assert (tmp_path / "threads" / uri).read_bytes() == (tmp_path / "dask" / uri).read_bytes()


def test_deployment_entry_flow_uses_the_configured_dask(cluster, tmp_path, mlflow_sqlite):
    """A deployment runs ``enhance_job`` with parameters only: ``config.dask`` must still send
    the shards to the cluster (not to the deployed flow's own one-thread runner)."""
    from flows.enhance import enhance_job

    lc, client = cluster
    inp = tmp_path / "night"
    _corpus(inp, n=4)
    summary = enhance_job(str(inp), str(tmp_path / "out"),
                          {**FAST, "shard_size": 1, "dask": lc.scheduler_address})
    assert summary["complete"]
    df = _scores(tmp_path / "out")
    assert len(df) == 4 and set(df["worker"]) <= set(_worker_names(client).values())


def test_worker_killed_mid_run_one_row_per_image(cluster, tmp_path, mlflow_sqlite):
    lc, client = cluster
    _install_slow_enhancer()
    client.register_plugin(_SlowEnhancerPlugin())
    inp, out = tmp_path / "night", tmp_path / "out"
    rels = _corpus(inp, n=12)
    pids = client.run(os.getpid)
    killed: dict = {}

    def kill_one_in_flight() -> None:
        """After the first done marker: SIGKILL a worker that has a shard in flight."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "pid" not in killed:
            if any(out.glob("runs/*/done/*.json")):
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if busy:
                    killed.update(worker=busy[0], pid=pids[busy[0]],
                                  shards=len(list(out.glob("runs/*/done/*.json"))))
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_in_flight, daemon=True)
    killer.start()
    summary = _run(inp, out, shard_size=2, enhancer="test-slow", dask=lc.scheduler_address)
    killer.join(timeout=5)

    assert "pid" in killed, "no worker was killed"
    assert killed["shards"] < 6  # killed while shards were still to do
    assert summary["complete"] and summary["failed_shards"] == []
    df = _scores(out)
    assert list(df["rel_path"]) == rels  # exactly one row per image, no duplicates
    assert (df["status"] == "ok").all() and sorted(df["shard"].unique()) == list(range(6))
    assert len(list(out.glob(f"runs/{summary['run_id']}/done/*.json"))) == 6
    assert summary["metrics"]["images"] == 12

    # Dask recomputes a finished task whose result died with its worker: the task then
    # returns the shard's marker instead of redoing (and rewriting) the shard
    from tasks.shards import process_shard_task
    from varlide.run import prepare_run

    plan = prepare_run(str(inp), str(out), Config(**{**FAST, "shard_size": 2,
                                                     "enhancer": "test-slow"}), write=False)
    parquet = out / "scores" / "night" / summary["run_id"] / "shard-00000.parquet"
    before = parquet.stat().st_mtime_ns
    again = client.submit(process_shard_task.fn, plan.job(plan.shards[0]), pure=False).result()
    assert again.rows == 2 and again.shard == 0 and parquet.stat().st_mtime_ns == before
    client.wait_for_workers(2, timeout=180)  # the nanny restarts the killed process


def test_gpu_bound_shards_carry_the_gpu_resource(cluster, tmp_path, mlflow_sqlite):
    """``auto`` on a cluster with a GPU worker: every shard lands there (resources GPU=1).

    No CUDA here, so ``auto`` resolves to cpu on that worker; the plain worker gets nothing.
    Without any GPU worker, ``--device cuda`` is an error naming the fix, not a run that waits
    forever for a worker that will not come.
    """
    lc, client = cluster
    info = client.scheduler_info()["workers"]
    gpu = next(a for a, w in info.items() if (w.get("resources") or {}).get("GPU"))
    inp = tmp_path / "night"
    _corpus(inp, n=6)
    summary = _run(inp, tmp_path / "out", shard_size=2, device="auto", dask=lc.scheduler_address)
    assert summary["complete"]
    df = _scores(tmp_path / "out")
    assert set(df["worker"]) == {_worker_names(client)[gpu]} and set(df["device"]) == {"cpu"}

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp://", host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as plain:
        with pytest.raises(ConfigError, match="GPU"):
            _run(inp, tmp_path / "out2", shard_size=2, device="cuda",
                 dask=plain.scheduler_address)


def test_cli_dask_local_2(tmp_path, mlflow_sqlite, monkeypatch, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from varlide.cli import main

    inp, out = tmp_path / "night", tmp_path / "out"
    rels = _corpus(inp, n=8)
    monkeypatch.setenv("VARLIDE_RETRY_DELAY_S", "0")
    monkeypatch.setenv("VARLIDE_DECODE_THREADS", "2")
    code = main(["enhance", str(inp), str(out), "--dask", "local:2", "--shard-size", "2",
                 "--metrics", "brightness,contrast", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out[captured.out.index("{"):])
    df = _scores(out)
    assert list(df["rel_path"]) == rels and summary["complete"]
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in df["worker"]}  # not here
    assert "8/8" in captured.err  # the bar advanced per finished shard
    key = f"varlide-progress-{summary['run_id']}"
    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    assert arts and float(arts[0].data) == 100.0


def test_dask_config_field():
    assert load_config(None, {"dask": "local:3"}).dask == "local:3"
    assert load_config(None, {"dask": "tcp://10.0.0.5:8786"}).dask == "tcp://10.0.0.5:8786"
    assert load_config(None, {}, environ={"VARLIDE_DASK": "local:2"}).dask == "local:2"
    for bad in ("local:0", "local", "local:x", "nowhere"):
        with pytest.raises(ConfigError, match="dask"):
            load_config(None, {"dask": bad})
    cfg = Config(dask="local:2")
    assert "dask" not in Config.output_fields
    assert cfg.run_id_for("/data/x") == Config().run_id_for("/data/x")

