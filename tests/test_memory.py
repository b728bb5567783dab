"""Memory bounded by a budget: the size parser, the engine's admission, real-size frames.

The real-size test runs the default job in a subprocess on 1920x1080 JPEG frames, inside a
memory cgroup capped at 2.5 GB where the machine lets us make one (else the subprocess's
measured peak RSS is asserted against the same bound), plus one 8000x6000 frame and four
PNG decompression bombs (100 Mpx in ~290 KB) that the default budget cannot hold at once:
each gets an error row that says why, never a dead run.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from varlide import memory
from varlide.config import ConfigError, load_config
from varlide.engine import clear_stage_cache, process_shard
from varlide.run import prepare_run

GB = 1 << 30
RSS_GOAL = int(2.5 * GB)  # issue 9: peak RSS of the default job at 720p / 1080p


def _photo_frames(folder: Path, n: int, size: tuple[int, int], shared: Path | None,
                  seed: int = 0) -> list[Path]:
    """n night-like JPEG frames of ``size`` (w, h): real photographs resized and darkened
    when ../shared/data is present, smooth synthetic scenes otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = sorted((shared / "train-sice").glob("*"))[:200] if shared else []
    out = []
    for i in range(n):
        if sources:
            im = Image.open(sources[int(rng.integers(len(sources)))]).convert("RGB")
            im = im.resize(size, Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.15, 0.5)
        else:
            small = rng.random((size[1] // 32 + 1, size[0] // 32 + 1, 3)) * 90
            im = Image.fromarray(small.astype(np.uint8)).resize(size, Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) + rng.normal(0, 3, (size[1], size[0], 3))
        path = folder / f"frame-{i:03d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        out.append(path)
    return out


def _shared() -> Path | None:
    from tests.conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "train-sice").is_dir() else None


# --------------------------------------------------------------------------- units


def test_sizes_parse_and_config_validates():
    assert memory.parse_size("2.5GB") == int(2.5 * GB)
    assert memory.parse_size("800M") == 800 << 20
    assert memory.parse_size("1GiB") == GB
    assert memory.parse_size(12345) == 12345
    assert load_config(overrides={"memory_budget": "1.5G"}).memory_budget == int(1.5 * GB)
    with pytest.raises(ConfigError, match="memory_budget"):
        load_config(overrides={"memory_budget": "plenty"})
    with pytest.raises(ConfigError, match="memory_budget"):
        load_config(overrides={"memory_budget": "1MB"})  # below the floor of 64 MB
    assert load_config(overrides={"memory_budget": "off"}).memory_budget == 0  # unbounded


def test_default_budget_follows_available_memory_and_workers():
    assert memory.default_budget(1, available=24 * GB) == memory.DEFAULT_CAP
    assert memory.default_budget(4, available=4 * GB) == GB // 2
    assert memory.default_budget(64, available=4 * GB) == memory.MIN_DEFAULT
    assert memory.workspace_for(memory.DEFAULT_CAP) <= memory.MAX_WORKSPACE
    assert memory.available_memory() > 0


# --------------------------------------------------------------------------- engine


def _shard_rows(corpus: Path, out: Path, **overrides) -> pd.DataFrame:
    cfg = load_config(overrides={"progress": False, **overrides})
    plan = prepare_run(str(corpus), str(out), cfg, fresh=True)
    for shard in plan.pending:
        process_shard(plan.job(shard))
    return pd.read_parquet(out / "scores").sort_values("rel_path").reset_index(drop=True)


def test_a_tight_budget_gives_the_same_rows(tmp_path):
    _photo_frames(tmp_path / "in", 5, (640, 480), _shared())
    clear_stage_cache()
    loose = _shard_rows(tmp_path / "in", tmp_path / "a", batch_size=8)
    # 192 MB: 128 MB for images after two 32 MB workspaces; a 640x480 frame holds ~14 MB
    # plus what its costliest measure needs beyond the workspace, so only a few frames are
    # admitted at once, batches are split, and the enhancer works in 32 MB bands.
    tight = _shard_rows(tmp_path / "in", tmp_path / "b", batch_size=8, memory_budget="192MB")
    assert list(tight["status"]) == ["ok"] * 5
    for col in ("visibility", "blur", "n_iter", "q_brightness_out", "q_piqe_out",
                "q_sharpness_out"):
        np.testing.assert_allclose(tight[col], loose[col], rtol=1e-5, atol=1e-5, err_msg=col)
    a = np.asarray(Image.open(tmp_path / "a" / loose["enhanced_uri"][0].split("/a/", 1)[1]))
    b = np.asarray(Image.open(tmp_path / "b" / tight["enhanced_uri"][0].split("/b/", 1)[1]))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # JPEG of near-equal floats


def test_an_image_the_budget_cannot_hold_is_an_error_row(tmp_path):
    _photo_frames(tmp_path / "in", 2, (320, 240), _shared())
    _photo_frames(tmp_path / "in" / "big", 1, (2000, 1500), _shared())
    clear_stage_cache()
    rows = _shard_rows(tmp_path / "in", tmp_path / "out", memory_budget="64MB")
    by_path = dict(zip(rows["rel_path"], rows["status"], strict=True))
    assert by_path == {"big/frame-000.jpg": "error", "frame-000.jpg": "ok", "frame-001.jpg": "ok"}
    err = rows.loc[rows["rel_path"] == "big/frame-000.jpg", "error"].item()
    assert "too large for the memory budget: 2000x1500" in err and "--memory-budget" in err
    assert rows["width"].tolist() == [2000, 320, 320]  # decoded geometry is still recorded


# --------------------------------------------------------------------------- real size


def _memory_cgroup(limit: int) -> tuple[Path, str] | None:
    """A child memory cgroup (v2 or v1) of ours capped at ``limit`` bytes, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    name = f"varlide-test-{uuid.uuid4().hex[:8]}"
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "memory":
            parent, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), \
                "memory.limit_in_bytes"
        elif controllers == "":
            parent, limit_file = Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max"
        else:
            continue
        child = parent / name
        try:
            child.mkdir()
            (child / limit_file).write_text(str(limit))
            return child, limit_file
        except OSError:
            if child.exists():
                child.rmdir()
    return None


@pytest.mark.slow
def test_default_job_on_1080p_frames_stays_inside_2_5_gb(tmp_path, mlflow_sqlite):
    _photo_frames(tmp_path / "frames", 16, (1920, 1080), _shared())
    _photo_frames(tmp_path / "frames" / "uhd", 1, (3840, 2160), _shared())
    _photo_frames(tmp_path / "frames" / "huge", 1, (8000, 6000), _shared())
    # decompression bombs under the default max_pixels: 100 Mpx of black in ~290 KB each
    # (the outside probe's 97 KB PNG cost 7 GB when the guard was per image and unbudgeted)
    bomb = tmp_path / "frames" / "bombs" / "bomb-0.png"
    bomb.parent.mkdir()
    Image.new("RGB", (10_000, 10_000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 400_000
    for i in range(1, 4):
        (bomb.parent / f"bomb-{i}.png").write_bytes(bomb.read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    group = _memory_cgroup(RSS_GOAL)

    def join_group() -> None:  # in the child, before exec: the cap covers all it starts
        if group is not None:
            (group[0] / "cgroup.procs").write_text(str(os.getpid()))

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "varlide.cli", "enhance", str(tmp_path / "frames"), str(out),
             "--no-progress"], env=env, capture_output=True, text=True, timeout=900,
            preexec_fn=join_group)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    finally:
        if group is not None:
            try:
                group[0].rmdir()
            except OSError:
                pass
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pd.read_parquet(out / "scores")
    assert len(rows) == 22
    bombs = rows[rows["rel_path"].str.startswith("bombs/")]
    assert len(bombs) == 4 and set(bombs["status"]) == {"error"}
    assert bombs["error"].str.startswith("too large for the memory budget: 10000x10000").all()
    frames = rows[~rows["rel_path"].str.startswith(("huge/", "bombs/"))]  # the 4K one fits
    assert set(frames["status"]) == {"ok"}, frames["error"].dropna().tolist()
    assert frames["enhanced_uri"].notna().all()
    huge = rows[rows["rel_path"] == "huge/frame-000.jpg"].iloc[0]
    # 48 Mpx needs ~2.3 GB at once (float32 input and output): beyond the default budget.
    assert huge["status"] == "error" and "too large for the memory budget" in huge["error"]
    if peak > before:  # this child set the high-water mark: it is its own peak
        assert peak <= RSS_GOAL, f"peak RSS {peak / GB:.2f} GB"
