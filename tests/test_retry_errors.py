"""``--retry-errors``: a new attempt at a run's error rows only, one current row per image,
the replaced rows kept queryable under ``runs/<run_id>/history/``.

The error comes from a file that is corrupt at the first attempt and repaired before the
retry (what a transient read failure looks like to the run)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import make_rgb
from PIL import Image

from varlide.cli import main
from varlide.config import Config
from varlide.engine import process_shard
from varlide.run import prepare_run, read_run_scores
from varlide.storage.runstore import RunStore

CHEAP = {"enhancer": "classic-curve", "metrics": ["brightness"], "prior": "analytic",
         "device": "cpu", "retry_delay_s": 0, "progress": False, "decode_threads": 1,
         "shard_size": 3}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_rgb(24, 32, seed=seed, scale=0.2)).save(buf, format="PNG")
    return buf.getvalue()


def _corpus(root: Path, n: int = 6) -> dict[str, bytes]:
    files = {f"cam/{i:02d}.png": _png(i) for i in range(n)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _run(inp: Path, out: Path, cfg: Config, retry: bool = False):
    plan = prepare_run(str(inp), str(out), cfg, retry_errors=retry)
    results = [process_shard(plan.job(s)) for s in plan.to_run]
    return plan, results


def _current(plan) -> dict[str, dict]:
    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id)
    rows = table.to_pylist()
    assert len(rows) == len({r["rel_path"] for r in rows}), "one current row per image"
    return {r["rel_path"]: r for r in rows}


def test_retry_redoes_only_error_rows_and_keeps_history(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    files = _corpus(inp)
    broken = ["cam/01.png", "cam/04.png"]  # one in each shard
    for rel in broken:
        (inp / rel).write_bytes(files[rel][:40])  # truncated: a decode error row
    cfg = Config(**CHEAP)
    plan, _ = _run(inp, out, cfg)
    first = _current(plan)
    assert sorted(r for r, row in first.items() if row["status"] == "error") == broken
    assert len(plan.shards) == 2

    # nothing asked: a plain rerun does not touch done shards with errors
    again = prepare_run(str(inp), str(out), cfg)
    assert again.to_run == [] and again.retry == {}

    for rel in broken:
        (inp / rel).write_bytes(files[rel])  # the "transient" cause is gone
    retry_plan, results = _run(inp, out, cfg, retry=True)
    assert retry_plan.retry == {0: 1, 1: 1}
    assert [r.attempt for r in results] == [1, 1]
    now = _current(retry_plan)
    assert sorted(now) == sorted(files)
    assert all(row["status"] == "ok" for row in now.values())
    for rel, row in first.items():  # ok rows are carried over unchanged
        if rel not in broken:
            assert now[rel]["sha256"] == row["sha256"]
            assert now[rel]["processed_at"] == row["processed_at"]
    store = RunStore(plan.output_uri, plan.run_id)
    markers = store.read_markers()
    assert {i: (m["attempt"], m["errors"], m["rows"]) for i, m in markers.items()} == {
        0: (1, 0, 3), 1: (1, 0, 3)}
    # the replaced attempt stays queryable, with its error rows
    for index, rel in enumerate(broken):
        old = pq.read_table(store.history_uri(index, 0).removeprefix("file://")).to_pylist()
        assert len(old) == 3
        assert {r["rel_path"] for r in old if r["status"] == "error"} == {rel}
    # and with every error gone a further retry has nothing to do
    assert prepare_run(str(inp), str(out), cfg, retry_errors=True).to_run == []


def test_history_is_never_overwritten(tmp_path):
    """A retry that crashed after keeping the old attempt and runs again keeps the first
    copy (the attempt's true rows), not the half-written state."""
    inp, out = tmp_path / "in", tmp_path / "out"
    files = _corpus(inp, n=3)
    (inp / "cam/00.png").write_bytes(b"not an image")
    cfg = Config(**CHEAP)
    plan, _ = _run(inp, out, cfg)
    store = RunStore(plan.output_uri, plan.run_id)
    kept = store.keep_attempt(plan.dataset, 0, 0)
    original = Path(kept.removeprefix("file://")).read_bytes()
    (inp / "cam/00.png").write_bytes(files["cam/00.png"])
    _run(inp, out, cfg, retry=True)
    assert Path(kept.removeprefix("file://")).read_bytes() == original
    assert _current(plan)["cam/00.png"]["status"] == "ok"


def test_cli_retry_errors(tmp_path, capsys, monkeypatch):
    """The command a user types: the rerun with --retry-errors exits 0 with no error left;
    --dry-run says what it would retry and writes nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    inp, out = tmp_path / "in", tmp_path / "out"
    files = _corpus(inp, n=4)
    (inp / "cam/02.png").write_bytes(files["cam/02.png"][:30])
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(CHEAP))
    args = ["enhance", str(inp), str(out), "--config", str(cfg_file), "--json"]
    assert main(args) == 0
    capsys.readouterr()
    (inp / "cam/02.png").write_bytes(files["cam/02.png"])
    assert main([*args, "--retry-errors", "--dry-run"]) == 0
    assert "retry   1 error row(s) in 1 done shard(s)" in capsys.readouterr().out
    assert main([*args, "--retry-errors"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") if "\n{" in printed
                                 else printed.index("{"):])
    assert summary["metrics"]["errors"] == 0 and summary["metrics"]["ok"] == 4
    plan = prepare_run(str(inp), str(out), Config(**CHEAP), write=False)
    assert all(r["status"] == "ok" for r in _current(plan).values())
