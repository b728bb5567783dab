"""Per-image and per-batch timeouts: a file whose decode hangs, or a batch whose enhancer
hangs, becomes error rows that say so after the configured time, and the shard goes on.

The hangs are real (a thread blocked on an event the test releases at the end), so the
abandoned threads and the fresh pool that carries the queued work are exercised as a
user's stuck NFS read or wedged stage would exercise them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from varlide import engine
from varlide.config import load_config
from varlide.engine import clear_stage_cache, process_shard
from varlide.models.base import ENHANCERS
from varlide.pools import Pool, TaskTimeout, stuck_threads
from varlide.run import prepare_run


@pytest.fixture
def hang():
    """An event the hung work waits on; released (and the threads gone) at teardown."""
    release = threading.Event()
    yield release
    release.set()
    deadline = time.monotonic() + 10
    while stuck_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    clear_stage_cache()


def _corpus(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8)).save(folder / name)


def _run(corpus: Path, out: Path, **overrides) -> pd.DataFrame:
    cfg = load_config(overrides={"progress": False, "enhancer": "classic-curve",
                                 "metrics": "brightness", **overrides})
    plan = prepare_run(str(corpus), str(out), cfg, fresh=True)
    for shard in plan.pending:
        result = process_shard(plan.job(shard))
        assert result.rows == len(shard.files)
    return pd.read_parquet(out / "scores").sort_values("rel_path").reset_index(drop=True)


def test_a_decode_that_hangs_is_an_error_row_and_the_shard_goes_on(tmp_path, monkeypatch,
                                                                    hang):
    names = {f"img-{i}.png": (48, 40) for i in range(5)} | {"hang.png": (48, 40)}
    _corpus(tmp_path / "in", names)
    real = engine._decode_on_cpu

    def decode(data, cfg, row):
        if row["rel_path"] == "hang.png":
            hang.wait(60)  # a read that never returns, as far as the run can tell
        return real(data, cfg, row)

    monkeypatch.setattr(engine, "_decode_on_cpu", decode)
    started = time.monotonic()
    # one decode thread: the queued files must move to fresh threads or the shard stalls
    rows = _run(tmp_path / "in", tmp_path / "out", image_timeout_s=1, decode_threads=1)
    assert time.monotonic() - started < 30
    assert len(rows) == 6 and rows["rel_path"].is_unique
    bad = rows.set_index("rel_path").loc["hang.png"]
    assert bad["status"] == "error"
    assert bad["error"] == ("timed out: reading and decoding took longer than 1 s "
                            "(image_timeout_s)")
    ok = rows[rows["rel_path"] != "hang.png"]
    assert (ok["status"] == "ok").all() and ok["enhanced_uri"].notna().all()
    assert stuck_threads() == 1  # left behind, still blocked; the fixture lets it go


def test_a_batch_that_hangs_is_error_rows_and_the_other_batches_are_ok(tmp_path,
                                                                        monkeypatch, hang):
    def factory(weights=None, **kwargs):
        model = ENHANCERS.get("classic-curve")(weights=weights, **kwargs)
        real = model.enhance

        def enhance(images, visibility, blur):
            if images.shape[-1] == 77:  # the odd-sized frames: a stage that wedges
                hang.wait(60)
            return real(images, visibility, blur)

        model.enhance = enhance
        return model

    monkeypatch.setitem(ENHANCERS._factories, "test-hang", factory)
    sizes = {f"a-{i}.png": (64, 48) for i in range(4)} | {"odd-0.png": (77, 50),
                                                          "odd-1.png": (77, 50)}
    _corpus(tmp_path / "in", sizes)
    rows = _run(tmp_path / "in", tmp_path / "out", enhancer="test-hang", batch_timeout_s=1,
                batch_size=4)
    assert len(rows) == 6 and rows["rel_path"].is_unique
    by_path = rows.set_index("rel_path")
    for name in ("odd-0.png", "odd-1.png"):
        assert by_path.loc[name, "status"] == "error"
        assert by_path.loc[name, "error"] == ("timed out: computing its batch of 2 took "
                                              "longer than 1 s (batch_timeout_s)")
        assert pd.isna(by_path.loc[name, "visibility"])  # the stuck lane wrote nothing here
    good = by_path.loc[[f"a-{i}.png" for i in range(4)]]
    assert (good["status"] == "ok").all() and good["enhanced_uri"].notna().all()
    assert good["visibility"].between(0, 1).all()


def test_timeouts_parse_off_and_reject_nonsense():
    assert load_config().image_timeout_s == 300 and load_config().batch_timeout_s == 1800
    cfg = load_config(overrides={"image_timeout_s": "off", "batch_timeout_s": "2.5"})
    assert cfg.image_timeout_s is None and cfg.batch_timeout_s == 2.5
    with pytest.raises(ValueError, match="image_timeout_s"):
        load_config(overrides={"image_timeout_s": "0"})


def test_queue_time_does_not_count_only_running_time_does(hang):
    pool = Pool(1, "t")
    first = pool.submit(hang.wait, 60)
    second = pool.submit(lambda: "done")  # waits in the queue behind the hung one
    with pytest.raises(TaskTimeout):
        first.result(0.3)
    assert second.started is None  # never started: its clock has not run
    pool.abandon()
    assert second.result(0.3) == "done"  # carried to a fresh thread
    assert pool.abandoned == 1
    pool.shutdown()


HANG_FOREVER = r"""
import sys, threading
from varlide import cli, engine

real = engine._decode_on_cpu
never = threading.Event()

def decode(data, cfg, row):
    if row["rel_path"] == "hang.png":
        never.wait()  # never set: only an exit that does not join this thread ends the run
    return real(data, cfg, row)

engine._decode_on_cpu = decode
sys.exit(cli.main(sys.argv[1:]))
"""


def test_the_cli_exits_with_a_thread_hung_forever(tmp_path):
    """A user's wedged NFS read: the run finishes, says so, and the process exits."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    _corpus(tmp_path / "in", {"a.png": (32, 24), "hang.png": (32, 24)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-c", HANG_FOREVER, "enhance", str(tmp_path / "in"),
         str(tmp_path / "out"), "--enhancer", "classic-curve", "--metrics", "brightness",
         "--image-timeout", "1", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 thread(s) stuck past a timeout are left behind" in proc.stderr
    rows = pd.read_parquet(tmp_path / "out" / "scores").set_index("rel_path")
    assert rows.loc["a.png", "status"] == "ok"
    assert rows.loc["hang.png", "error"].startswith("timed out: reading and decoding")
