"""Nothing lost, nothing mixed (issue 10): the ways a run could lose or mix rows, each shown
on real files and real runs.

- a done marker is never trusted without its Parquet (a deleted ``scores/``, a ``--fresh``
  interrupted half-way): status says so, the rerun redoes those shards, one row per image;
- the run's lock is held before its manifest is written: a second start of a live run
  changes nothing;
- a run id is bound to its input and output-changing config: a reuse with others is a
  usage error, an execution-only change resumes;
- a name with a backslash is its own file, read and written under its own name;
- the listing never reads what is not a regular file inside the input root, and reports
  names that collide on a case-insensitive filesystem.

Most tests drive the library (``prepare_run`` + ``varlide.engine.process_shard``, what the
flow's shard tasks call) for speed; the lock test runs the real flow.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_rgb
from PIL import Image

from varlide.cli import main
from varlide.config import Config, ConfigError
from varlide.run import prepare_run, read_run_scores
from varlide.storage.listing import (
    LINK_OUTSIDE,
    NOT_REGULAR,
    SkippedEntry,
    fold_collisions,
    list_corpus,
)
from varlide.storage.runstore import RunLockedError, RunStore, run_status

CHEAP = {"enhancer": "classic-curve", "metrics": ["brightness"], "prior": "analytic",
         "device": "cpu", "retry_delay_s": 0, "progress": False, "decode_threads": 1,
         "shard_size": 2}


def _png(path: Path, h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(make_rgb(h, w, seed=seed, scale=0.2)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _corpus(root: Path, n: int = 4) -> list[str]:
    rels = [f"cam/{i:02d}.png" for i in range(n)]
    for i, rel in enumerate(rels):
        _png(root / rel, seed=i)
    return rels


def _cfg(**overrides) -> Config:
    return Config(**{**CHEAP, **overrides})


def _finish(inp: Path, out: Path, cfg: Config, fresh: bool = False):
    """Plan (or resume) and run every pending shard, as the flow's shard tasks do."""
    from varlide.engine import process_shard

    plan = prepare_run(str(inp), str(out), cfg, fresh=fresh)
    for shard in plan.pending:
        process_shard(plan.job(shard))
    return plan


def _rows(out: Path, plan):
    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id)
    return [] if table is None else sorted(table.column("rel_path").to_pylist())


def _marked(out: Path, run_id: str) -> set[str]:
    """Shard names with a done marker, straight from the folder."""
    return {p.stem for p in (out / "runs" / run_id / "done").glob("shard-*.json")}


def _written(out: Path, plan) -> set[str]:
    """Shard names with a Parquet file, straight from the folder."""
    return {p.stem for p in (out / "scores" / plan.dataset / plan.run_id).glob("*.parquet")}


# ---------------------------------------------------------------------------------------
# 1. a done marker is never trusted without its Parquet


def test_deleted_scores_are_redone_with_one_row_per_image(tmp_path, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    rels = _corpus(inp, 4)
    plan = _finish(inp, out, _cfg())
    assert _rows(out, plan) == rels
    shutil.rmtree(out / "scores")

    status = run_status(plan.output_uri, plan.run_id)
    assert not status.complete and status.done == [] and status.rows == 0
    assert status.missing_parquet == [0, 1] and status.pending == [0, 1]

    with caplog.at_level(logging.WARNING, logger="varlide.run"):
        again = prepare_run(str(inp), str(out), _cfg())
    assert again.resumed and again.done == set() and len(again.pending) == 2
    assert "shard 00000" in caplog.text and "shard 00001" in caplog.text
    assert "Parquet" in caplog.text and "had a missing Parquet file" in again.describe()
    _finish(inp, out, _cfg())
    assert _rows(out, plan) == rels  # every row back, exactly one per image
    status = run_status(plan.output_uri, plan.run_id)
    assert status.complete and status.rows == 4 and status.missing_parquet == []


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_a_damaged_parquet_of_a_done_shard_is_redone(tmp_path, caplog, damage):
    inp, out = tmp_path / "in", tmp_path / "out"
    rels = _corpus(inp, 4)
    plan = _finish(inp, out, _cfg())
    shard1 = out / "scores" / plan.dataset / plan.run_id / "shard-00001.parquet"
    good = shard1.read_bytes()
    shard1.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"PAR1 garbage")

    status = run_status(plan.output_uri, plan.run_id)
    assert status.damaged_parquet == [1] and status.done == [0] and not status.complete
    with caplog.at_level(logging.WARNING, logger="varlide.run"):
        again = prepare_run(str(inp), str(out), _cfg())
    assert again.done == {0} and [s.index for s in again.pending] == [1]
    assert "damaged" in caplog.text and "had a damaged Parquet file; redone: 00001" in \
        again.describe()
    assert not shard1.exists()  # removed, after its marker: no reader trips on it
    for shard in again.pending:
        from varlide.engine import process_shard

        process_shard(again.job(shard))
    assert _rows(out, plan) == rels
    assert run_status(plan.output_uri, plan.run_id).complete


# A ``--fresh`` interrupted at its k-th deletion, for every k: a child process whose audit
# hook (a real interpreter feature, not a stand-in for our code) raises at the k-th
# os.remove / os.rmdir / shutil.rmtree, as a kill at that instant would stop it. It prints
# the state each crash left: the done markers and the Parquet files still there.
CRASH_EACH_DELETION = r"""
import json, pathlib, shutil, sys
from varlide.config import Config
from varlide.run import prepare_run

inp, out, pristine, config, leave = sys.argv[1:6]
out, pristine = pathlib.Path(out), pathlib.Path(pristine)

class Crash(BaseException):
    pass

state = {"armed": False, "left": 0}

def hook(event, args):
    if state["armed"] and event in ("os.remove", "os.rmdir", "shutil.rmtree"):
        state["left"] -= 1
        if state["left"] < 0:
            state["armed"] = False
            raise Crash(event)

sys.addaudithook(hook)

def names(folder, pattern):
    return sorted(p.stem for p in out.glob(folder + "/" + pattern))

def crash_at(k):
    shutil.rmtree(out)
    shutil.copytree(pristine, out, symlinks=True)
    state.update(armed=True, left=k)
    try:
        prepare_run(inp, str(out), Config(**json.loads(config)), fresh=True)
        return False
    except Crash:
        return True
    finally:
        state["armed"] = False

states = []
k = 0
while crash_at(k) and k < 200:
    states.append({"k": k, "markers": names("runs/*/done", "shard-*.json"),
                   "parquet": names("scores/*/*", "shard-*.parquet"),
                   "manifest": bool(list(out.glob("runs/*/manifest.json")))})
    k += 1
first_loss = next(s["k"] for s in states if len(s["parquet"]) < len(states[0]["parquet"]))
crash_at(first_loss if leave == "first-parquet-loss" else k)
print(json.dumps(states))
"""


def test_fresh_interrupted_at_any_point_leaves_no_marker_without_parquet(tmp_path):
    import subprocess
    import sys

    inp, out, pristine = tmp_path / "in", tmp_path / "out", tmp_path / "pristine"
    rels = _corpus(inp, 4)
    cfg = _cfg()
    plan = _finish(inp, out, cfg)
    shutil.copytree(out, pristine, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_EACH_DELETION, str(inp), str(out), str(pristine),
         json.dumps(cfg.model_dump(mode="json")), "first-parquet-loss"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(states) >= 9  # 2 markers, 1 manifest, 2 Parquet, 4 images at least
    for state in states:
        assert set(state["markers"]) <= set(state["parquet"]), state
        assert state["manifest"] or not state["markers"], state

    # left interrupted just after the first Parquet file went: the same command (with or
    # without --fresh) brings every row back, exactly one per image
    again = _finish(inp, out, cfg)
    assert _rows(out, again) == rels
    assert run_status(plan.output_uri, plan.run_id).complete
    assert _rows(out, _finish(inp, out, cfg, fresh=True)) == rels


def test_leftovers_without_a_manifest_are_cleared_before_a_new_plan(tmp_path, caplog):
    """An interrupted clear can leave Parquet without a manifest: a new plan of fewer
    shards must not inherit the old shards' rows."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 4)
    plan = _finish(inp, out, _cfg())
    for done in (out / "runs" / plan.run_id / "done").iterdir():
        done.unlink()
    (out / "runs" / plan.run_id / "manifest.json").unlink()
    (inp / "cam" / "03.png").unlink()
    (inp / "cam" / "02.png").unlink()  # now one shard, not two
    with caplog.at_level(logging.WARNING, logger="varlide.run"):
        again = _finish(inp, out, _cfg())
    assert "no manifest" in caplog.text
    assert _written(out, plan) == {"shard-00000"}
    assert _rows(out, again) == ["cam/00.png", "cam/01.png"]


# ---------------------------------------------------------------------------------------
# 2. the manifest is written only under the run's lock


def _manifest_bytes(out: Path, run_id: str) -> bytes | None:
    path = out / "runs" / run_id / "manifest.json"
    return path.read_bytes() if path.exists() else None


def test_planning_under_someone_elses_lock_writes_nothing(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 2)
    run_id = _cfg().run_id_for(str(inp))
    holder = RunStore(str(out), run_id)
    with holder.lock(owner="the-live-run"):  # the first start, still listing
        _png(inp / "cam" / "late.png", seed=9)
        with pytest.raises(RunLockedError, match="the-live-run"):
            prepare_run(str(inp), str(out), _cfg())
        with pytest.raises(RunLockedError):
            prepare_run(str(inp), str(out), _cfg(), fresh=True)
        assert _manifest_bytes(out, run_id) is None


@pytest.mark.usefixtures("prefect_harness")
def test_second_start_of_a_live_run_does_not_touch_its_manifest(tmp_path, mlflow_sqlite):
    from flows.enhance import run_enhance

    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 2)
    cfg = _cfg()
    run_id = cfg.run_id_for(str(inp))
    holder = RunStore(str(out), run_id)
    with holder.lock(owner="the-live-run"):
        # the live run is still listing: no manifest yet; a file appears meanwhile
        _png(inp / "cam" / "late.png", seed=9)
        with pytest.raises(RunLockedError):
            run_enhance(str(inp), str(out), cfg)
        assert _manifest_bytes(out, run_id) is None
        # the live run wrote its plan; more files appear; a second start, even --fresh
        prepare_run(str(inp), str(out), cfg, store=holder)
        before = _manifest_bytes(out, run_id)
        _png(inp / "cam" / "later.png", seed=10)
        for fresh in (False, True):
            with pytest.raises(RunLockedError):
                run_enhance(str(inp), str(out), cfg, fresh=fresh)
            assert _manifest_bytes(out, run_id) == before
    planned = [f[0] for s in json.loads(before)["plan"] for f in s["files"]]
    assert planned == ["cam/00.png", "cam/01.png", "cam/late.png"]  # the live run's own


# ---------------------------------------------------------------------------------------
# 3. a run id is bound to its input and output-changing config


def test_reused_run_id_with_another_input_is_refused(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _corpus(a, 2)
    _corpus(b, 3)
    prepare_run(str(a), str(out), _cfg(run_id="nightly"))
    before = _manifest_bytes(out, "nightly")
    with pytest.raises(ConfigError) as err:
        prepare_run(str(b), str(out), _cfg(run_id="nightly"))
    assert type(err.value).__name__ == "RunMismatchError"
    text = str(err.value)
    assert "input_uri" in text and str(b) in text and "--run-id" in text and "--fresh" in text
    assert _manifest_bytes(out, "nightly") == before
    code = main(["enhance", str(b), str(out), "--run-id", "nightly", "--enhancer",
                 "classic-curve", "--metrics", "brightness", "--prior", "analytic",
                 "--shard-size", "2", "--device", "cpu", "--dry-run"])
    assert code == 2 and "input_uri" in capsys.readouterr().err


def test_reused_run_id_with_another_output_config_is_refused(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 2)
    prepare_run(str(inp), str(out), _cfg(run_id="nightly"))
    with pytest.raises(ConfigError, match=r"metrics.*--fresh") as err:
        prepare_run(str(inp), str(out), _cfg(run_id="nightly",
                                             metrics=["brightness", "contrast"]))
    assert "input_uri" not in str(err.value)
    with pytest.raises(ConfigError, match="enhance"):
        prepare_run(str(inp), str(out), _cfg(run_id="nightly", enhance=False), write=False)
    # --fresh is the way to reuse the id for the new settings
    plan = prepare_run(str(inp), str(out), _cfg(run_id="nightly", enhance=False), fresh=True)
    assert not plan.resumed


def test_execution_only_changes_resume(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 4)
    first = _finish(inp, out, _cfg(run_id="nightly"))
    again = prepare_run(str(inp), str(out), _cfg(
        run_id="nightly", batch_size=1, workers=3, decode_threads=2, device="auto",
        retries=5, memory_budget="off", experiment="elsewhere"))
    assert again.resumed and again.done == {0, 1} and again.shards == first.shards


# ---------------------------------------------------------------------------------------
# 4. a backslash is part of a name


def test_backslash_name_is_read_and_written_as_its_own_file(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    slash = _png(inp / "a" / "b.png", h=24, w=32, seed=1)
    back = _png(inp / "a\\b.png", h=40, w=56, seed=2)
    plan = _finish(inp, out, _cfg())
    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id).to_pandas()
    rows = table.set_index("rel_path")
    assert sorted(rows.index) == ["a/b.png", "a\\b.png"]
    assert (rows["status"] == "ok").all(), rows["error"].to_dict()
    assert rows.loc["a/b.png", "sha256"] == hashlib.sha256(slash).hexdigest()
    assert rows.loc["a\\b.png", "sha256"] == hashlib.sha256(back).hexdigest()
    assert rows.loc["a\\b.png", "width"] == 56 and rows.loc["a/b.png", "width"] == 32
    uris = rows["enhanced_uri"].tolist()
    assert len(set(uris)) == 2  # no output overwrote the other
    for rel, width in (("a/b.png", 32), ("a\\b.png", 56)):
        with Image.open(rows.loc[rel, "enhanced_uri"]) as im:
            assert im.width == width
    assert any("separates folders" in n for n in plan.notes)  # reported for Windows users


# ---------------------------------------------------------------------------------------
# 5. the listing reads only regular files inside the input root


def test_fifo_and_links_to_it_are_skipped_not_listed(tmp_path):
    inp = tmp_path / "in"
    _png(inp / "good.png")
    os.mkfifo(inp / "pipe.png")
    os.symlink(inp / "pipe.png", inp / "to-pipe.png")
    assert [f.rel_path for f in list_corpus(str(inp))] == ["good.png"]
    skipped: list[SkippedEntry] = []
    files = list_corpus(str(inp), skipped=skipped)
    assert [f.rel_path for f in files] == ["good.png"]
    assert skipped == [SkippedEntry("pipe.png", NOT_REGULAR),
                       SkippedEntry("to-pipe.png", NOT_REGULAR)]
    plan = prepare_run(str(inp), str(tmp_path / "out"), _cfg(), write=False)
    assert plan.images == 3 and "2 entries not read, an error row each" in plan.describe()
    assert "not a regular file" in plan.describe()
    plan = _finish(inp, tmp_path / "out", _cfg())  # never opened: the run cannot hang
    rows = _table(plan)
    assert rows["good.png"]["status"] == "ok"
    for name in ("pipe.png", "to-pipe.png"):
        assert rows[name]["status"] == "error" and rows[name]["size_bytes"] is None
        assert rows[name]["error"] == "not read: not a regular file"


def _table(plan) -> dict[str, dict]:
    table = read_run_scores(plan.output_uri, plan.dataset, plan.run_id)
    return {r["rel_path"]: r for r in table.to_pylist()}


def test_a_folder_that_cannot_be_listed_is_an_error_row(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    _png(inp / "good.png")
    _png(inp / "locked" / "hidden-from-us.png")
    real_scandir = os.scandir

    def scandir(path):  # root ignores permission bits; the refusal a user gets is this
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    plan = _finish(inp, tmp_path / "out", _cfg())
    rows = _table(plan)
    assert sorted(rows) == ["good.png", "locked/"]
    assert rows["locked/"]["status"] == "error"
    assert rows["locked/"]["error"] == "not read: folder cannot be listed: Permission denied"
    assert rows["good.png"]["status"] == "ok"


def test_an_input_folder_that_cannot_be_listed_is_a_clear_error(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    _png(inp / "good.png")
    monkeypatch.setattr(os, "scandir", lambda p: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(p))))
    with pytest.raises(PermissionError, match="cannot list the input folder"):
        list_corpus(str(inp))


def test_s3_input_keys_that_escape_the_prefix_are_error_rows(s3_bucket, tmp_path):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key="in/ok.png", Body=_png(tmp_path / "ok.png"))
    for key in ("in/../evil.png", "in/a/../../evil2.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"not read")
    cfg = _cfg()
    plan = prepare_run(f"{s3_bucket}/in", str(tmp_path / "out"), cfg)
    assert "2 entries not read, an error row each: object key escapes" in plan.describe()
    for shard in plan.pending:
        from varlide.engine import process_shard

        process_shard(plan.job(shard))
    rows = _table(plan)
    assert sorted(rows) == ["../evil.png", "a/../../evil2.png", "ok.png"]
    assert rows["ok.png"]["status"] == "ok"
    for name in ("../evil.png", "a/../../evil2.png"):
        assert rows[name]["status"] == "error" and rows[name]["sha256"] is None
        assert rows[name]["error"] == "not read: object key escapes the input prefix"
    assert not list((tmp_path / "out").rglob("evil*"))  # nothing written under that name


def test_symlinks_out_of_the_root_are_not_followed(tmp_path, caplog):
    inp, outside = tmp_path / "in", tmp_path / "outside"
    _png(inp / "good.png")
    (outside / "frames").mkdir(parents=True)
    (outside / "secret.png").write_text("root:x:0:0:secret")
    _png(outside / "frames" / "f.png")
    os.symlink(outside / "secret.png", inp / "evil.png")
    os.symlink(outside / "frames", inp / "frames")
    os.symlink(inp / "good.png", inp / "alias.png")  # inside the root: still listed
    (inp / "sub").mkdir()
    os.symlink("../good.png", inp / "sub" / "rel.png")
    listed = ["alias.png", "good.png", "sub/rel.png"]
    assert [f.rel_path for f in list_corpus(str(inp))] == listed
    skipped: list[SkippedEntry] = []
    with caplog.at_level(logging.WARNING, logger="varlide.storage.listing"):
        files = list_corpus(str(inp), skipped=skipped)
    assert [f.rel_path for f in files] == listed
    assert skipped == [SkippedEntry("evil.png", LINK_OUTSIDE),
                       SkippedEntry("frames", LINK_OUTSIDE)]
    assert "evil.png" in caplog.text and "root:x" not in caplog.text  # never read


def test_names_differing_only_in_case_are_reported(tmp_path, caplog):
    inp = tmp_path / "in"
    _png(inp / "A.png", seed=1)
    _png(inp / "a.png", seed=2)
    _png(inp / "b.png", seed=3)
    with caplog.at_level(logging.WARNING, logger="varlide.run"):
        plan = prepare_run(str(inp), str(tmp_path / "out"), _cfg(), write=False)
    assert "case-insensitive" in caplog.text and "'A.png' ~ 'a.png'" in caplog.text
    assert any("'A.png' ~ 'a.png'" in n for n in plan.notes)
    assert "case-insensitive" in plan.describe()


def test_fold_collisions():
    assert fold_collisions(["a.png", "b.png", "c/d.png"]) == []
    assert fold_collisions(["A.png", "a.png", "b.png"]) == [["A.png", "a.png"]]
    assert fold_collisions(["x/Y.png", "X/y.PNG", "a\\b.png", "a/b.png"]) == [
        ["x/Y.png", "X/y.PNG"], ["a\\b.png", "a/b.png"]]
    big = [f"frame-{i:06d}.jpg" for i in range(10_000)]
    assert fold_collisions(big) == []



def test_a_run_finished_before_markers_recorded_sizes_resumes_with_nothing_to_do(tmp_path):
    """An output folder made before this version (markers without ``parquet_bytes``, a
    manifest without ``mlflow_tracking_uri``) resumes: same run id, nothing recomputed."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _corpus(inp, 4)
    plan = _finish(inp, out, _cfg())
    run = out / "runs" / plan.run_id
    for marker in (run / "done").glob("shard-*.json"):
        data = json.loads(marker.read_text())
        data.pop("parquet_bytes")
        marker.write_text(json.dumps(data))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("mlflow_tracking_uri")
    (run / "manifest.json").write_text(json.dumps(manifest))
    parquet = sorted((out / "scores").rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parquet]
    again = prepare_run(str(inp), str(out), _cfg())
    assert again.run_id == plan.run_id and again.resumed
    assert again.done == {0, 1} and again.pending == []
    assert [p.stat().st_mtime_ns for p in parquet] == stamps
    assert run_status(plan.output_uri, plan.run_id).complete
