"""Storage: URIs, corpus listing, shard plans, the run store, Parquet results.

Every backend-dependent test runs on a real local folder and on moto's S3 server (loopback).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from varlide.storage.listing import IMAGE_EXTENSIONS, CorpusFile, list_corpus
from varlide.storage.plan import PlannedFile, Shard, plan_from_json, plan_shards, plan_to_json
from varlide.storage.results import read_table, run_schema, write_rows
from varlide.storage.runstore import (
    RunLockedError,
    RunStore,
    list_run_ids,
    run_status,
)
from varlide.storage.uri import UnsafePathError, filesystem, join, safe_relpath

# ---------------------------------------------------------------------------------------
# helpers and fixtures


def put(uri: str, data: bytes = b"x") -> None:
    fs, path = filesystem(uri)
    parent = path.rpartition("/")[0]
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def all_files(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    root = path.rstrip("/") + "/"
    return sorted(p[len(root):] for p in fs.find(path))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An output/input root URI on a local folder or the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


# ---------------------------------------------------------------------------------------
# uri


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/../../x", "a/..", "/etc/passwd", "\\\\server\\x", "..\\x",
            "a\\..\\..\\x", "a/..\\..\\x",
            "C:x", "c:\\windows", "a\x00b", "s3://b/k"],
)
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


def test_safe_relpath_normalises():
    assert safe_relpath("a/./b//c.png") == "a/b/c.png"
    # a backslash is part of the name (POSIX files, S3 keys): never another file's path
    assert safe_relpath("a\\b.png") == "a\\b.png"
    assert join("/in", "a\\b.png") == "/in/a\\b.png" != join("/in", "a/b.png")
    assert safe_relpath("1:2.png") == "1:2.png"  # not a drive


def test_join_keeps_roots():
    assert join("s3://b/p/", "x", "y.png") == "s3://b/p/x/y.png"
    assert join("memory://", "a") == "memory://a"
    assert join("file:///", "a") == "file:///a"
    assert join("/", "a") == "/a"
    assert join("/tmp/o//", "a") == "/tmp/o/a"
    with pytest.raises(UnsafePathError):
        join("/tmp/o", "../x")


# ---------------------------------------------------------------------------------------
# listing

CORPUS = {
    "b.png": 3,
    "a/x.JPG": 5,
    "a/y.jpeg": 7,
    "a/.hidden.png": 1,
    ".git/z.png": 1,
    "a/.cache/w.png": 1,
    "a/notes.txt": 1,
    "c/d/e.tif": 2,
    "c/d/f.PNG": 4,
    "z.webp": 6,
    "noext": 1,
}
VISIBLE = ["a/x.JPG", "a/y.jpeg", "b.png", "c/d/e.tif", "c/d/f.PNG", "z.webp"]


@pytest.fixture(params=["local", "file", "s3", "memory"])
def corpus(request, tmp_path) -> str:
    if request.param == "local":
        base = str(tmp_path / "corpus")
    elif request.param == "file":
        base = (tmp_path / "corpus").as_uri()
    elif request.param == "memory":
        base = f"memory://varlide-test-{uuid.uuid4().hex[:8]}/corpus"
    else:
        bucket = request.getfixturevalue("s3_bucket")
        base = f"{bucket}/corpus"
        put(f"{bucket}/corpus/empty/", b"")  # a directory placeholder object
        put(f"{bucket}/corpus2/sibling.png")  # same key prefix, another folder
    for rel, size in CORPUS.items():
        put(join(base, rel), b"\0" * size)
    yield base
    if request.param == "memory":
        fs, path = filesystem(base)
        fs.rm(path.rsplit("/", 1)[0], recursive=True)


def test_list_corpus_recursive_sorted_hidden_extensions(corpus):
    files = list_corpus(corpus)
    assert [f.rel_path for f in files] == VISIBLE
    assert files[0] == CorpusFile("a/x.JPG", 5)
    assert {f.rel_path: f.size for f in files} == {k: CORPUS[k] for k in VISIBLE}
    assert list_corpus(corpus.rstrip("/") + "/") == files  # trailing slash is the same


def test_list_corpus_filters_and_limit(corpus):
    def rels(**kw):
        return [f.rel_path for f in list_corpus(corpus, **kw)]

    assert rels(include=["*.png"]) == ["b.png"]  # basename match, case-sensitive glob
    assert rels(include=["*.png", "*.PNG"]) == ["b.png", "c/d/f.PNG"]
    assert rels(include=["c/*"]) == ["c/d/e.tif", "c/d/f.PNG"]  # '*' crosses '/'
    assert rels(exclude=["a/"]) == ["b.png", "c/d/e.tif", "c/d/f.PNG", "z.webp"]
    assert rels(include=["*.png", "*.PNG"], exclude=["b*"]) == ["c/d/f.PNG"]
    assert rels(exclude=["e.tif"]) == ["a/x.JPG", "a/y.jpeg", "b.png", "c/d/f.PNG", "z.webp"]
    assert rels(limit=2) == VISIBLE[:2]
    assert rels(include=["c/*"], limit=1) == ["c/d/e.tif"]  # limit applied last
    assert rels(limit=0) == []


def test_list_corpus_missing_and_single_file(corpus):
    missing = corpus + "-nope"
    with pytest.raises(FileNotFoundError, match="corpus-nope"):
        list_corpus(missing)
    with pytest.raises(NotADirectoryError, match="folder"):
        list_corpus(join(corpus, "b.png"))


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".pnm"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------
# plan


def test_plan_shards_and_json_round_trip():
    files = [PlannedFile(f"f{i:02d}.png", i) for i in range(7)]
    files[3] = PlannedFile("f03.tif", 3, out_rel_path="f03.png", out_format="png")
    files[4] = PlannedFile("f04.png", 4, out_error="collision with f04.jpg")
    shards = plan_shards(files, 3)
    assert [s.index for s in shards] == [0, 1, 2]
    assert [len(s.files) for s in shards] == [3, 3, 1]
    assert [f for s in shards for f in s.files] == files  # listing order kept
    data = json.loads(json.dumps(plan_to_json(shards)))
    assert plan_from_json(data) == shards
    assert len(data[0]["files"][0]) < 5  # trailing None fields are omitted
    assert plan_shards([], 5) == []
    assert plan_shards(files, 100) == [Shard(0, tuple(files))]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError):
            plan_shards(files, bad)
    with pytest.raises(ValueError, match="malformed"):
        plan_from_json([{"index": 0}])


# ---------------------------------------------------------------------------------------
# run store


def manifest_for(run_id: str, n_shards: int = 4, per_shard: int = 2) -> dict:
    files = [PlannedFile(f"img{i}.png", 10) for i in range(n_shards * per_shard - 1)]
    return {
        "run_id": run_id,
        "dataset": "night",
        "input_uri": "s3://in/night",
        "created_at": "2026-01-01T00:00:00+00:00",
        "plan": plan_to_json(plan_shards(files, per_shard)),
        "config": {"shard_size": per_shard},
    }


def test_runstore_paths(root):
    store = RunStore(root, "r1")
    assert store.scores_uri("night", 7) == f"{root}/scores/night/r1/shard-00007.parquet"
    assert store.marker_uri(3) == f"{root}/runs/r1/done/shard-00003.json"
    assert store.failed_uri(3) == f"{root}/runs/r1/failed/shard-00003.json"
    assert store.manifest_uri == f"{root}/runs/r1/manifest.json"
    assert store.lock_uri == f"{root}/runs/r1/lock.json"
    assert store.enhanced_uri("a/b.png") == f"{root}/enhanced/r1/a/b.png"
    for bad in ("../x", "/etc/passwd", "a/../../x", "C:x", ""):
        with pytest.raises(UnsafePathError):
            store.enhanced_uri(bad)
    for bad_id in ("", "..", "a/b", "/x", "a\\b"):
        with pytest.raises(ValueError):
            RunStore(root, bad_id)
    for bad_dataset in ("a/b", "a\\b"):
        with pytest.raises(ValueError):
            store.scores_uri(bad_dataset, 0)
    with pytest.raises(ValueError):
        store.marker_uri(-1)


def test_manifest_markers_failures(root):
    store = RunStore(root, "r1")
    assert not store.exists()
    with pytest.raises(FileNotFoundError, match="manifest"):
        store.read_manifest()
    assert store.read_markers() == {} and store.done_shards() == set()
    manifest = manifest_for("r1")
    store.write_manifest(manifest)
    assert store.exists()
    assert store.read_manifest() == manifest

    store.write_failure(1, "boom: decoder exploded")
    store.write_failure(3, "disk full")
    assert set(store.read_failures()) == {1, 3}
    assert store.read_failures()[1]["error"] == "boom: decoder exploded"
    store.write_marker(0, {"rows": 2, "errors": 0})
    store.write_marker(1, {"rows": 2, "errors": 1})  # redone: failure marker goes
    assert store.done_shards() == {0, 1}
    markers = store.read_markers()
    assert markers[1]["rows"] == 2 and markers[1]["errors"] == 1 and markers[1]["shard"] == 1
    assert set(store.read_failures()) == {3}
    # a fresh instance (another process) sees the same
    assert RunStore(root, "r1").done_shards() == {0, 1}


def test_local_json_writes_leave_no_temp_files(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    store.write_manifest({"run_id": "r1", "plan": []})
    store.write_marker(0, {"rows": 1, "errors": 0})
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["manifest.json", "shard-00000.json"]


def test_lock_second_acquire_raises_then_release(root):
    a, b = RunStore(root, "r1"), RunStore(root, "r1")
    with a.lock(owner="worker-a") as record:
        assert exists(a.lock_uri) and a.holds_lock
        assert a.read_lock()["token"] == record["token"]
        with pytest.raises(RunLockedError) as info:
            b.acquire(owner="worker-b")
        msg = str(info.value)
        assert "worker-a" in msg and record["host"] in msg and str(record["pid"]) in msg
        assert a.lock_uri in msg and record["since"] in msg
        assert info.value.holder["token"] == record["token"]
        assert info.value.lock_uri == a.lock_uri
        with pytest.raises(RuntimeError):
            a.acquire()  # not re-entrant
    assert not exists(a.lock_uri) and not a.holds_lock
    with b.lock():
        assert b.read_lock()["owner"].endswith(str(record["pid"]))
    assert not exists(b.lock_uri)


def test_lock_stale_taken_over_and_release_only_own(root, caplog):
    old = time.time() - 3600
    put(RunStore(root, "r1").lock_uri, json.dumps({
        "owner": "ghost", "host": "deadhost", "pid": 1, "token": "t-ghost",
        "since": datetime.fromtimestamp(old, UTC).isoformat(),
        "heartbeat": datetime.fromtimestamp(old, UTC).isoformat(),
    }).encode())  # no heartbeat_ts: the ISO heartbeat is used
    a = RunStore(root, "r1")
    with pytest.raises(RunLockedError, match="ghost"):
        a.acquire(stale_after_s=7200)  # an hour old is still live for 2 h
    with caplog.at_level(logging.WARNING, logger="varlide.storage.runstore"):
        a.acquire(stale_after_s=60)
    assert "stale" in caplog.text and "ghost" in caplog.text
    assert a.read_lock()["token"] != "t-ghost"

    before = a.read_lock()["heartbeat_ts"]
    time.sleep(0.01)
    a.heartbeat()
    assert a.read_lock()["heartbeat_ts"] > before

    b = RunStore(root, "r1")
    b.acquire(owner="b", stale_after_s=-1)  # everything counts as stale
    with pytest.raises(RunLockedError, match="lost the lock"):
        a.heartbeat()
    a.release()  # not ours any more: left alone
    assert b.read_lock()["owner"] == "b"
    b.release()
    assert not exists(b.lock_uri)


def test_lock_concurrent_acquire_one_winner(root):
    stores = [RunStore(root, "r1") for _ in range(6)]
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def go(store):
        barrier.wait()
        try:
            store.acquire()
            results.append("won")
        except RunLockedError:
            results.append("lost")

    threads = [threading.Thread(target=go, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 5 + ["won"]


def test_s3_lock_create_is_conditional(s3_bucket):
    store = RunStore(s3_bucket, "r1")
    fs, path = filesystem(store.lock_uri)
    fs.pipe_file(path, b"{}", mode="create")
    with pytest.raises(FileExistsError):  # If-None-Match honoured by the server
        fs.pipe_file(path, b"{}", mode="create")


def test_heartbeat_without_lock_is_noop(root):
    RunStore(root, "r1").heartbeat()
    assert not exists(RunStore(root, "r1").lock_uri)


def test_clear(root):
    store = RunStore(root, "r1")
    store.write_manifest(manifest_for("r1"))
    store.write_marker(0, {"rows": 1, "errors": 0})
    store.write_failure(1, "x")
    write_rows([{"rel_path": "a.png"}], [], store.scores_uri("night", 0))
    write_rows([{"rel_path": "a.png"}], [], store.scores_uri("day", 0))  # other dataset
    put(store.enhanced_uri("a/b.png"))
    other = RunStore(root, "r2")
    other.write_manifest(manifest_for("r2"))

    holder = RunStore(root, "r1")
    with holder.lock():
        with pytest.raises(RunLockedError):
            store.clear("night")  # someone else holds the lock
        holder.clear("night")
        assert all_files(f"{root}/runs/r1") == ["lock.json"]
        assert exists(holder.lock_uri)
    assert not store.exists()
    assert store.done_shards() == set() and store.read_failures() == {}
    assert all_files(f"{root}/scores") == ["day/r1/shard-00000.parquet"]
    assert all_files(f"{root}/enhanced/r1") == []
    assert other.exists()
    store.clear("night")  # nothing left, no lock: fine
    assert list_run_ids(root) == ["r2"]


def test_run_status_and_list_run_ids(root):
    assert list_run_ids(root) == []
    store = RunStore(root, "r1")
    store.write_manifest(manifest_for("r1", n_shards=4, per_shard=2))  # 7 images
    store.write_failure(0, "flaky")
    for shard in range(4):  # a done shard is a marker AND its Parquet
        write_rows([{"rel_path": f"img{shard}.png"}], [], store.scores_uri("night", shard))
    store.write_marker(0, {"rows": 2, "errors": 1})
    store.write_marker(2, {"rows": 2, "errors": 0})
    store.write_failure(3, "disk full")
    status = run_status(root, "r1")
    assert status.shards_total == 4 and status.images == 7
    assert status.done == [0, 2] and status.failed == [3] and status.pending == [1]
    assert status.rows == 4 and status.errors == 1
    assert status.dataset == "night" and status.input_uri == "s3://in/night"
    assert status.created_at == "2026-01-01T00:00:00+00:00"
    assert not status.complete
    store.write_marker(1, {"rows": 2, "errors": 0})
    store.write_marker(3, {"rows": 1, "errors": 0})
    status = run_status(root, "r1")
    assert status.complete and status.rows == 7 and status.failed == []
    assert status.missing_parquet == []

    # a marker whose Parquet is gone is not done: status says so, the run is not complete
    fs, path = filesystem(store.scores_uri("night", 2))
    fs.rm_file(path)
    status = run_status(root, "r1")
    assert status.missing_parquet == [2] and status.pending == [2] and not status.complete
    assert status.done == [0, 1, 3] and status.rows == 5
    assert RunStore(root, "r1").verified_done("night") == ({0, 1, 3}, [2])

    RunStore(root, "r0").write_manifest(manifest_for("r0"))
    with RunStore(root, "r9").lock():  # a lock but no manifest: not a run
        assert list_run_ids(root) == ["r0", "r1"]
    with pytest.raises(FileNotFoundError):
        run_status(root, "nope")


# ---------------------------------------------------------------------------------------
# results


def test_write_rows_read_table_schema_stable(root):
    metrics = ["brightness"]
    rows = [
        {"run_id": "r1", "dataset": "night", "shard": 0, "rel_path": f"img{i}.png",
         "status": "ok", "q_brightness_in": 0.1 * i,
         "processed_at": datetime(2026, 1, 1, tzinfo=UTC)}
        for i in range(3)
    ]
    uri = f"{root}/scores/night/r1/shard-00000.parquet"
    assert write_rows(rows, metrics, uri).rows == 3
    write_rows(rows[:1], metrics, f"{root}/scores/night/r1/shard-00001.parquet")
    table = read_table(uri)
    assert table.schema == run_schema(metrics)
    assert table.schema.field("error").type == pa.string()  # all null, still a string
    assert table.column("error").null_count == 3
    assert table.column("rel_path").to_pylist() == ["img0.png", "img1.png", "img2.png"]
    folder = read_table(f"{root}/scores/night/r1")
    assert folder.num_rows == 4
    assert folder.schema.field("error").type == pa.string()
    assert all(not name.startswith(".") for name in all_files(f"{root}/scores"))
    with pytest.raises(KeyError, match="not_a_column"):
        write_rows([{"not_a_column": 1}], metrics, uri)


def test_lock_of_a_dead_process_on_this_host_is_taken_over(root):
    """A crash (kill -9) must not block the re-run until the heartbeat goes stale."""
    import socket
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    now = datetime.now(UTC).isoformat()
    put(RunStore(root, "r2").lock_uri, json.dumps({
        "owner": "crashed", "host": socket.gethostname(), "pid": dead_pid, "token": "t-dead",
        "since": now, "heartbeat": now, "heartbeat_ts": time.time(),
    }).encode())
    store = RunStore(root, "r2")
    store.acquire()
    assert store.read_lock()["token"] != "t-dead"
    store.release()
    # a live holder on this host (ourselves, another store) still blocks
    first = RunStore(root, "r2")
    first.acquire(owner="alive")
    with pytest.raises(RunLockedError, match="alive"):
        RunStore(root, "r2").acquire()
    first.release()


def test_s3_keys_that_escape_the_prefix_are_refused_loudly(s3_bucket, caplog):
    import os

    import boto3
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in ("in/ok.png", "in/../evil.png", "in/a/../../evil2.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with caplog.at_level(logging.WARNING, logger="varlide.storage.listing"):
        files = list_corpus(f"{s3_bucket}/in")
    assert [f.rel_path for f in files] == ["ok.png"]
    assert "evil.png" in caplog.text and "evil2.png" in caplog.text
