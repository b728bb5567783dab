"""Faults a cluster sees, injected on loopback: nothing lost, nothing duplicated, nothing mixed.

Every scenario ends with the same check: read the run's Parquet back (from the S3 upstream
directly, not through the fault proxy) and find exactly one row per planned image, a done
marker per shard, and nothing else under the output prefix.

- S3 faults: ``tests/faultproxy.py`` in front of moto's server (503 SlowDown, 500, resets
  mid-body, slow responses at seeded random rates; targeted rules for the rest).
- Process death: ``varlide enhance`` in a subprocess, SIGKILLed (first kill on the user's
  path, the CLI's own temporary Prefect server; later kills point ``PREFECT_API_URL`` at the
  session's Prefect test harness to save ~20 s of server start-up each), then the same
  command; SIGTERM and SIGINT.
- Concurrency: a second live start of one run id (SIGSTOP keeps the first one live but
  still), two run ids on one output.
- Disk full: a small tmpfs as OUTPUT (root only; skipped cleanly otherwise).

Seeds: ``VARLIDE_FAULT_SEED`` (default below) drives every random choice here. The long
version of all this is ``benchmarks/soak.py``; figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_rgb
from faultproxy import FaultProxy
from PIL import Image
from proctree import alive as _alive
from proctree import descendants as _descendants

SEED = int(os.environ.get("VARLIDE_FAULT_SEED", "20261202"))
LINUX = sys.platform.startswith("linux")
GONE_WITHIN_S = 10.0  # a killed CLI's processes (its Prefect server) must be gone by then
STOP_WITHIN_S = 60.0  # SIGTERM / SIGINT: the CLI must have exited by then
CLI_TIMEOUT_S = 300.0
FAST = {"enhancer": "classic-curve", "metrics": ["brightness"], "retry_delay_s": 0,
        "progress": False, "device": "cpu"}


# ----------------------------------------------------------------------------- corpora

def _png(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_rgb(size, size, seed=seed, scale=0.2)).save(buf, format="PNG")
    return buf.getvalue()


def _rels(n: int) -> list[str]:
    return sorted(f"cam_{i % 3}/f{i:05d}.png" for i in range(n))


def _local_corpus(root: Path, n: int) -> list[str]:
    rels = _rels(n)
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(i))
    return rels


def _upstream_fs(endpoint: str):
    """s3fs straight at moto (not through the proxy): what the test trusts."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True,
                             use_listings_cache=False)


def _s3_corpus(fs, prefix: str, n: int) -> list[str]:
    rels = _rels(n)
    fs.pipe({f"{prefix}/{rel}": _png(i) for i, rel in enumerate(rels)})
    return rels


# ----------------------------------------------------------------------------- checks

def _local_state(out: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file under ``out``: {relative path: (mtime_ns, bytes of markers/manifest)}."""
    state = {}
    if not out.exists():
        return state
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            data = p.read_bytes() if p.suffix == ".json" and "/done/" in f"/{rel}" else None
            state[rel] = (p.stat().st_mtime_ns, data)
    return state


def _markers(state: dict) -> dict[str, tuple[int, bytes | None]]:
    return {k: v for k, v in state.items() if re.search(r"/done/shard-\d+\.json$", k)}


def _only_run_id(out: Path) -> str:
    ids = sorted(p.name for p in (out / "runs").iterdir() if (p / "manifest.json").exists())
    assert len(ids) == 1, ids
    return ids[0]


def _check_local_exactly_once(out: Path, rels: list[str], run_id: str | None = None,
                              all_ok: bool = True) -> dict:
    """One row per image, markers = shards = Parquet files, no stray files. Returns counts."""
    run_id = run_id or _only_run_id(out)
    manifest = json.loads((out / "runs" / run_id / "manifest.json").read_text())
    shards = len(manifest["plan"])
    dataset = manifest["dataset"]
    files = sorted((out / "scores" / dataset / run_id).glob("*.parquet"))
    markers = sorted((out / "runs" / run_id / "done").glob("shard-*.json"))
    assert len(files) == shards, (len(files), shards)
    assert [m.stem for m in markers] == [f.stem for f in files]
    tables = [pq.read_table(f) for f in files]
    found = sorted(r for t in tables for r in t.column("rel_path").to_pylist())
    dup = len(found) - len(set(found))
    lost = sorted(set(rels) - set(found))
    assert dup == 0 and not lost and found == sorted(rels), (dup, lost[:5])
    for m, t in zip(markers, tables, strict=True):
        assert json.loads(m.read_text())["rows"] == t.num_rows
    statuses = [s for t in tables for s in t.column("status").to_pylist()]
    errors = [e for t in tables for e in t.column("error").to_pylist() if e]
    if all_ok:
        assert set(statuses) == {"ok"}, errors[:3]
    run_ids = {r for t in tables for r in t.column("run_id").to_pylist()}
    assert run_ids == {run_id}
    stray = [p for p in (out / "scores" / dataset / run_id).iterdir()
             if not p.name.startswith(".") and p.suffix != ".parquet"]  # readers skip dot files
    assert not stray, stray
    assert not (out / "runs" / run_id / "lock.json").exists(), "lock left after a clean run"
    return {"expected": len(rels), "found": len(found), "duplicated": dup, "lost": len(lost),
            "errors": statuses.count("error"), "shards": shards}






def _processes_of(tag: str) -> list[str]:
    """Live processes (not this one) whose command line or PREFECT_HOME mention ``tag``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            home = ""
            if "python" in cmd or "uvicorn" in cmd or "varlide" in cmd:
                home = p.environ().get("PREFECT_HOME", "")
            if (tag in cmd or home.startswith(tag)) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.pid}: {cmd[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the CLI exited (code {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- the CLI

class Cli:
    """``varlide enhance`` of one corpus as a subprocess; every start logged under ``logs``."""

    def __init__(self, tmp: Path, inp: str, out: str, *extra: str, shard_size: int = 8,
                 prefect_api: str | None = None, env: dict | None = None):
        self.tmp = tmp
        self.cmd = [sys.executable, "-m", "varlide.cli", "enhance", inp, out,
                    "--enhancer", "classic-curve", "--metrics", "brightness", "--device", "cpu",
                    "--shard-size", str(shard_size), "--no-progress", *extra]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "PREFECT_HOME": str(tmp / "prefect-home"),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                    "VARLIDE_RETRY_DELAY_S": "0", "PREFECT_LOGGING_LEVEL": "WARNING",
                    **(env or {})}
        self.env.pop("PREFECT_API_URL", None)
        if prefect_api:
            self.env["PREFECT_API_URL"] = prefect_api
        self.logs = tmp / "cli-logs"
        self.logs.mkdir(exist_ok=True)
        self.started: list[subprocess.Popen] = []

    def start(self, *extra: str, prefect_api: str | None = "keep") -> subprocess.Popen:
        env = dict(self.env)
        if prefect_api != "keep":
            env.pop("PREFECT_API_URL", None)
            if prefect_api:
                env["PREFECT_API_URL"] = prefect_api
        n = len(self.started)
        with open(self.logs / f"{n:02d}.out", "wb") as out, \
                open(self.logs / f"{n:02d}.err", "wb") as err:  # the child keeps its copies
            proc = subprocess.Popen([*self.cmd, *extra], env=env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, cwd=self.tmp)
        proc.log_index = n  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def run(self, *extra: str, timeout: float = CLI_TIMEOUT_S, **kw) -> tuple[int, str, str]:
        proc = self.start(*extra, **kw)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"varlide enhance did not finish within {timeout:.0f} s:\n"
                                 + self.err(proc)[-3000:]) from None
        return proc.returncode, self.out(proc), self.err(proc)

    def out(self, proc) -> str:
        return (self.logs / f"{proc.log_index:02d}.out").read_text(errors="replace")

    def err(self, proc) -> str:
        return (self.logs / f"{proc.log_index:02d}.err").read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in self.started:
            tree = _descendants(proc.pid) if proc.poll() is None else []
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for p in _alive(tree):
                p.kill()


@pytest.fixture
def harness_api(prefect_harness) -> str:
    """The session's Prefect test-harness API URL, for CLI subprocesses."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect test harness set no API URL"
    return url


@pytest.fixture
def cli_factory(tmp_path):
    made: list[Cli] = []

    def make(*args, **kw) -> Cli:
        cli = Cli(tmp_path, *args, **kw)
        made.append(cli)
        return cli

    yield make
    for cli in made:
        cli.cleanup()


# ============================================================================ S3 faults

def _s3_check_exactly_once(fs, bucket: str, out_prefix: str, rels: list[str]) -> dict:
    """From the upstream: one row per image, markers = shards, no orphaned/partial objects."""
    root = f"{bucket}/{out_prefix}"
    keys = sorted(fs.find(root))
    run_ids = sorted({k.split("/")[3] for k in keys if k.startswith(f"{root}/runs/")})
    assert len(run_ids) == 1, run_ids
    run_id = run_ids[0]
    manifest = json.loads(fs.cat_file(f"{root}/runs/{run_id}/manifest.json"))
    dataset, shards = manifest["dataset"], len(manifest["plan"])
    parquet = [k for k in keys if re.fullmatch(
        rf"{re.escape(root)}/scores/{re.escape(dataset)}/{run_id}/shard-\d{{5}}\.parquet", k)]
    markers = [k for k in keys if re.fullmatch(
        rf"{re.escape(root)}/runs/{run_id}/done/shard-\d{{5}}\.json", k)]
    enhanced = {k for k in keys if k.startswith(f"{root}/enhanced/{run_id}/")}
    known = set(parquet) | set(markers) | enhanced | {f"{root}/runs/{run_id}/manifest.json"}
    orphans = sorted(set(keys) - known)
    assert not orphans, f"objects that are no part of a finished run: {orphans[:10]}"
    assert len(parquet) == shards and len(markers) == shards, (len(parquet), len(markers), shards)
    tables = {}
    for k in parquet:
        with fs.open(k, "rb") as fh:
            tables[k] = pq.read_table(fh)  # a partial object would not parse
    found = sorted(r for t in tables.values() for r in t.column("rel_path").to_pylist())
    dup = len(found) - len(set(found))
    lost = sorted(set(rels) - set(found))
    assert dup == 0 and not lost and found == sorted(rels), (dup, lost[:5])
    for k in markers:
        m = json.loads(fs.cat_file(k))
        index = int(k.rsplit("-", 1)[1].split(".")[0])
        p = f"{root}/scores/{dataset}/{run_id}/shard-{index:05d}.parquet"
        assert m["rows"] == tables[p].num_rows
    rows = [r for t in tables.values() for r in t.to_pylist()]
    errors = [(r["rel_path"], r["error"]) for r in rows if r["status"] != "ok"]
    want_enhanced = {r["enhanced_uri"].removeprefix("s3://") for r in rows if r["enhanced_uri"]}
    assert want_enhanced == enhanced, sorted(enhanced ^ want_enhanced)[:5]
    return {"run_id": run_id, "expected": len(rels), "found": len(found), "duplicated": dup,
            "lost": len(lost), "errors": errors, "shards": shards}


@pytest.mark.s3
def test_s3_faults_exactly_one_row_per_image(s3_server, s3_bucket, prefect_harness,
                                             mlflow_sqlite, monkeypatch):
    """~20 % of S3 requests faulted (503 SlowDown, 500, resets mid-body, slow answers), input
    and output on S3: one row per image, every row ok, no orphaned objects, markers = shards;
    a shard that legitimately fails after its retries completes on the same command."""
    import s3fs

    from flows.enhance import run_enhance
    from varlide.config import Config

    up = _upstream_fs(s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    rels = _s3_corpus(up, f"{bucket}/in/night", 240)
    inp, out = f"{s3_bucket}/in/night", f"{s3_bucket}/out"
    cfg = Config(**FAST, shard_size=20, retries=2, workers=2, decode_threads=4)
    proxy = FaultProxy(s3_server, slowdown=0.05, internal_error=0.05, reset=0.06, delay=0.04,
                       delay_s=(0.02, 0.2), seed=SEED)
    attempts, retried = [], 0
    with proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            for _ in range(3):  # the same command again while shards failed after retries
                t0 = time.perf_counter()
                summary = run_enhance(inp, out, cfg)
                attempts.append((summary["failed_shards"], round(time.perf_counter() - t0, 1)))
                retried += summary["metrics"]["store_retries"]  # an MLflow metric
                if summary["complete"] and not summary["failed_shards"]:
                    break
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    stats = proxy.summary()
    print(f"\nS3 faults: {stats} attempts {attempts}")
    assert summary["complete"] and not summary["failed_shards"], attempts
    for kind in ("slowdown", "internal_error", "reset", "delay"):
        assert proxy.counts[kind] > 0, f"no {kind} injected: {stats}"
    assert proxy.forwarded > len(rels)  # every image read, every output written through it
    result = _s3_check_exactly_once(up, bucket, "out", rels)
    assert result["run_id"] == summary["run_id"]
    assert not result["errors"], f"transient S3 faults became error rows: {result['errors'][:3]}"
    assert summary["metrics"]["images"] == len(rels)
    # the retries are counted: at most one per fault that fails a request (a slow answer
    # is not retried; faults while planning fall outside the shards' count)
    failing = sum(proxy.counts[k] for k in ("slowdown", "internal_error", "reset"))
    assert 0 < retried <= failing, (retried, stats)


@pytest.mark.s3
def test_s3_lost_lock_put_response_does_not_lock_out_the_run(s3_server, s3_bucket,
                                                             prefect_harness, mlflow_sqlite,
                                                             monkeypatch):
    import s3fs

    from flows.enhance import run_enhance
    from varlide.config import Config

    up = _upstream_fs(s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    rels = _s3_corpus(up, f"{bucket}/in/night", 6)
    proxy = FaultProxy(s3_server, seed=SEED)
    rule = proxy.add_rule(lambda m, p, h: m == "PUT" and p.split("?")[0].endswith("/lock.json")
                          and h.get("If-None-Match") == "*", "lost_response", times=1)
    with proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            summary = run_enhance(f"{s3_bucket}/in/night", f"{s3_bucket}/out",
                                  Config(**FAST, shard_size=3))
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            assert rule.hits == 1  # the fault really hit the lock's conditional PUT
    assert summary["complete"]
    _s3_check_exactly_once(up, bucket, "out", rels)


# ============================================================================ process death

@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="psutil process tree checks and PR_SET_PDEATHSIG: Linux")
def test_sigkill_at_random_points_then_same_command(tmp_path, harness_api, cli_factory):
    """SIGKILL ``varlide enhance`` three times (seeded delays): mid-run on the user's path (its
    own temporary Prefect server), during start-up/planning, mid-run again; then the same
    command: one row per image, shards done before a kill not recomputed, nothing running."""
    rng = random.Random(SEED)
    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 200)
    cli = cli_factory(str(inp), str(out), shard_size=8)  # 25 shards
    shards = 25
    kills = [("own-server", "mid-run"), ("harness", "start-up"), ("harness", "mid-run")]
    frozen: dict[str, tuple] = {}  # markers (and their Parquet) that existed after a kill
    log = []
    for server, point in kills:
        before = _markers(_local_state(out))
        proc = cli.start(prefect_api=None if server == "own-server" else harness_api)
        t0 = time.monotonic()
        if point == "mid-run":
            _wait_for(lambda b=before: len(_markers(_local_state(out))) > len(b), 240, proc,
                      "a new shard marker")
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            time.sleep(rng.uniform(0.3, 2.5))
        assert proc.poll() is None, f"finished before the kill: {cli.err(proc)[-2000:]}"
        tree = _descendants(proc.pid)
        if server == "own-server" and point == "mid-run":  # its temporary server is up
            assert any("prefect.server.api.server:create_app" in " ".join(p.cmdline())
                       for p in _alive(tree)), "the CLI runs no Prefect server of its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + GONE_WITHIN_S
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(tree)
        assert not left, f"left running after SIGKILL: {[p.cmdline()[:4] for p in left]}"
        state = _local_state(out)
        after = _markers(state)
        assert len(after) < shards, "the run had finished: the kill was not mid-run"
        for name, value in before.items():  # the killed run did not redo finished shards
            assert after.get(name) == value, f"{name} rewritten by the killed run"
        for name, value in after.items():
            pq_rel = re.sub(r"^runs/([^/]+)/done/(shard-\d+)\.json$",
                            r"scores/night/\1/\2.parquet", name)
            frozen.setdefault(name, (value, state[pq_rel][0]))
        log.append((server, point, round(time.monotonic() - t0, 1), len(after)))
    assert log[-1][3] > 0 and log[0][3] > 0
    code, _, err = cli.run(prefect_api=harness_api)
    assert code == 0, err[-3000:]
    state = _local_state(out)
    for name, (marker, parquet_mtime) in frozen.items():  # not recomputed
        assert state[name] == marker, f"{name} recomputed after the kills"
        pq_rel = re.sub(r"^runs/([^/]+)/done/(shard-\d+)\.json$",
                        r"scores/night/\1/\2.parquet", name)
        assert state[pq_rel][0] == parquet_mtime, f"{pq_rel} rewritten"
    counts = _check_local_exactly_once(out, rels)
    assert counts["shards"] == shards
    assert not _processes_of(str(tmp_path)), _processes_of(str(tmp_path))
    print(f"\nkills (server, point, s after start, markers at kill): {log}; {counts}")


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.skipif(not LINUX, reason="psutil process checks: Linux")
def test_sigkill_between_parquet_and_marker(tmp_path, s3_server, s3_bucket, harness_api,
                                            cli_factory):
    """The marker's PUT of one shard is stalled by the proxy; the CLI is SIGKILLed while that
    shard's Parquet is written and its marker is not: the same command redoes that shard
    only (one row per image), finished shards keep their markers."""
    up = _upstream_fs(s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    inp = tmp_path / "in" / "night"
    rels = _local_corpus(inp, 40)
    root = f"{bucket}/out"
    target = 2
    proxy = FaultProxy(s3_server, seed=SEED)
    rule = proxy.add_rule(lambda m, p, h: m == "PUT" and re.search(
        rf"/done/shard-{target:05d}\.json$", p.split("?")[0]) is not None,
        "stall", times=1, delay_s=120.0)
    with proxy:
        cli = cli_factory(str(inp), f"{s3_bucket}/out", shard_size=8,
                          env={"AWS_ENDPOINT_URL": proxy.url})  # 5 shards
        proc = cli.start(prefect_api=harness_api)

        def between():
            try:
                return rule.hits >= 1 and up.exists(
                    f"{root}/scores/night/{_run_id_s3(up, root)}/shard-{target:05d}.parquet")
            except (FileNotFoundError, IndexError):
                return False

        _wait_for(between, 240, proc, f"shard {target}'s Parquet with its marker stalled")
        run_id = _run_id_s3(up, root)
        done_before = {k: up.cat_file(k) for k in up.find(f"{root}/runs/{run_id}/done")}
        assert f"{root}/runs/{run_id}/done/shard-{target:05d}.json" not in done_before
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert proxy.dropped == 1  # the stalled marker PUT never reached the store
        code, _, err = cli.run(prefect_api=harness_api)
        assert code == 0, err[-3000:]
    result = _s3_check_exactly_once(up, bucket, "out", rels)
    assert not result["errors"]
    for k, v in done_before.items():
        assert up.cat_file(k) == v, f"{k} recomputed"
    assert not _processes_of(str(tmp_path))


def _run_id_s3(fs, root: str) -> str:
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/runs", detail=False))[0]


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="POSIX signals and psutil: Linux")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_sigint_stop_then_same_command(sig, tmp_path, harness_api, cli_factory):
    """A signal mid-run: the CLI stops within STOP_WITHIN_S with a non-zero exit code, its
    lock is released (or held by a dead pid: taken over at once), no shard is finished after
    the lock was given up, and the same command then completes, one row per image."""
    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 160)
    cli = cli_factory(str(inp), str(out), shard_size=8)
    proc = cli.start(prefect_api=harness_api)
    _wait_for(lambda: _markers(_local_state(out)), 240, proc, "a first marker")
    run_id = _only_run_id(out)
    lock = out / "runs" / run_id / "lock.json"
    holder = json.loads(lock.read_text())
    os.kill(proc.pid, sig)
    t0 = time.monotonic()
    at_signal = len(_markers(_local_state(out)))
    released_markers = None
    while proc.poll() is None and time.monotonic() - t0 < STOP_WITHIN_S:
        if released_markers is None and not lock.exists():
            released_markers = _markers(_local_state(out))
        time.sleep(0.02)
    stopped_s = time.monotonic() - t0
    running = proc.poll() is None
    if running:  # record, then end it, so the rest can be checked
        proc.kill()
        proc.wait()
    final_markers = _markers(_local_state(out))
    lock_after = json.loads(lock.read_text()) if lock.exists() else None
    err = cli.err(proc)
    print(f"\n{sig.name}: stopped after {stopped_s:.1f} s, rc {proc.returncode}, lock "
          f"{'left' if lock_after else 'released'}, markers at release "
          f"{None if released_markers is None else len(released_markers)}, at exit "
          f"{len(final_markers)}; stderr tail: {err[-400:]!r}")
    assert not running, f"{sig.name}: still running after {STOP_WITHIN_S:.0f} s"
    # exit 0 only for a run that finished: a signal the interpreter handles after the flow's
    # code has returned (the main thread was in a C call) is logged and dropped by Prefect
    complete = len(final_markers) == len(rels) // 8
    assert proc.returncode != 0 or complete, (
        f"exit 0 with {len(final_markers)} of {len(rels) // 8} shards done "
        f"({at_signal} at the signal)")
    if lock_after is not None:  # left behind: must be the dead process's own lock
        assert lock_after["token"] == holder["token"] and not psutil.pid_exists(holder["pid"])
    if released_markers is not None:
        assert final_markers == released_markers, (
            f"{len(final_markers) - len(released_markers)} shard(s) finished after the "
            "lock was released")
    code, _, err2 = cli.run(prefect_api=harness_api)
    assert code == 0, err2[-3000:]
    _check_local_exactly_once(out, rels)


# ============================================================================ concurrency

@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="SIGSTOP/SIGCONT and psutil: Linux")
def test_concurrent_runs_same_and_different_run_ids(tmp_path, harness_api, cli_factory):
    """Same run id twice at once: the second start is refused (exit 3) and writes nothing;
    the first completes alone. Then two run ids on the same output at once: both complete,
    each with its own rows, the first run's files untouched."""
    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 48)
    cli = cli_factory(str(inp), str(out), shard_size=8)
    first = cli.start(prefect_api=harness_api)
    _wait_for(lambda: _markers(_local_state(out)), 240, first, "the first run's first marker")
    run_id = _only_run_id(out)
    os.kill(first.pid, signal.SIGSTOP)  # live (its pid exists) but still: a deterministic race
    try:
        before = _local_state(out)
        assert (out / "runs" / run_id / "lock.json").exists()
        code, _, err = cli.run(prefect_api=harness_api)
        assert code == 3, f"second start of the same run id: exit {code}\n{err[-2000:]}"
        assert "locked" in err
        assert _local_state(out) == before, "the refused run wrote into the live run"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.wait(timeout=CLI_TIMEOUT_S)
    assert first.returncode == 0, cli.err(first)[-3000:]
    _check_local_exactly_once(out, rels, run_id)
    settled = _local_state(out)

    a = cli.start("--run-id", "r-one", prefect_api=harness_api)
    b = cli.start("--run-id", "r-two", prefect_api=harness_api)
    for p in (a, b):
        p.wait(timeout=CLI_TIMEOUT_S)
        assert p.returncode == 0, cli.err(p)[-3000:]
    for rid in ("r-one", "r-two"):
        _check_local_exactly_once(out, rels, rid)
    after = _local_state(out)
    assert {k: v for k, v in after.items() if k in settled} == settled
    enhanced = {rid: sorted(p.relative_to(out / "enhanced" / rid).as_posix()
                            for p in (out / "enhanced" / rid).rglob("*.png"))
                for rid in (run_id, "r-one", "r-two")}
    assert enhanced[run_id] == enhanced["r-one"] == enhanced["r-two"] == rels


# ============================================================================ disk full

def _mount_tmpfs(path: Path, size: str) -> None:
    if not LINUX:
        pytest.skip("tmpfs mounts: Linux only")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as OUTPUT needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                        "varlide-disk-full", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory, prefect_harness):
    """OUTPUT on a 192 KB tmpfs: the first run fills it; the disk is then made bigger and the
    same command run again. Shared by the disk-full tests (one scenario, several claims)."""
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("diskfull")
    mnt = tmp / "mnt"
    _mount_tmpfs(mnt, "192k")
    try:
        inp, out = tmp / "in" / "night", mnt / "out"
        rels = _local_corpus(inp, 96)
        cli = Cli(tmp, str(inp), str(out), "--retries", "1", shard_size=8,
                  prefect_api=PREFECT_API_URL.value())
        try:
            t0 = time.monotonic()
            code1, out1, err1 = cli.run()
            first_s = time.monotonic() - t0
            visible = sorted(out.rglob("*.parquet"))
            unreadable = []
            for f in visible:
                try:
                    pq.read_table(f)
                except Exception as exc:  # a corrupt visible Parquet file
                    unreadable.append(f"{f.name}: {exc}")
            hidden = sorted(p.name for p in out.rglob(".*") if p.is_file())
            run_id = _only_run_id(out)
            failed = sorted(p.name for p in (out / "runs" / run_id / "failed").glob("*.json")) \
                if (out / "runs" / run_id / "failed").exists() else []
            _remount(mnt, "64m")  # space freed
            t1 = time.monotonic()
            code2, out2, err2 = cli.run()
            recover_s = time.monotonic() - t1
            yield {"rels": rels, "out": out, "code1": code1, "out1": out1, "err1": err1,
                   "visible_parquet": len(visible), "unreadable": unreadable, "hidden": hidden,
                   "failed_markers": failed, "code2": code2, "err2": err2,
                   "first_s": first_s, "recover_s": recover_s}
        finally:
            cli.cleanup()
    finally:
        _umount(mnt)


@pytest.mark.slow
def test_disk_full_then_freed_space_completes(disk_full_run):
    r = disk_full_run
    print(f"\ndisk full: first run rc {r['code1']} in {r['first_s']:.1f} s, "
          f"{r['visible_parquet']} Parquet visible, failure markers {r['failed_markers']}, "
          f"hidden files {r['hidden']}; after freeing: rc {r['code2']} in {r['recover_s']:.1f} s")
    assert r["code1"] != 0, "a run onto a full disk exited 0"
    assert "No space left on device" in r["out1"] + r["err1"], r["err1"][-2000:]
    assert not r["unreadable"], r["unreadable"]
    assert r["code2"] == 0, r["err2"][-3000:]
    counts = _check_local_exactly_once(r["out"], r["rels"], all_ok=False)
    assert counts["duplicated"] == 0 and counts["lost"] == 0


@pytest.mark.slow
def test_disk_full_fails_cleanly(disk_full_run):
    r = disk_full_run
    assert r["code1"] == 1
    assert "Traceback" not in r["err1"], r["err1"][-1500:]
    assert re.search(r"(?m)^error: .*No space left on device", r["err1"]), r["err1"][-1500:]


@pytest.mark.slow
def test_transient_disk_full_on_enhanced_images_is_retried(tmp_path, harness_api, cli_factory):
    """The enhanced images' folder on its own 64 KB volume (a separate mount, so the Parquet
    and markers still fit): the shards that hit the full volume fail (no permanent `write
    failed` rows in a shard marked done), the CLI names the cause, and once space is freed
    the same command leaves every image ok, exactly once."""
    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 48)
    run_id = "r-diskfull"
    enhanced = out / "enhanced" / run_id
    _mount_tmpfs(enhanced, "64k")
    try:
        cli = cli_factory(str(inp), str(out), "--run-id", run_id, "--retries", "0",
                          shard_size=8)
        code1, _, err1 = cli.run(prefect_api=harness_api)
        assert code1 == 1, err1[-2000:]
        assert "No space left on device" in err1, err1[-2000:]
        rows = [r for f in sorted((out / "scores").rglob("*.parquet"))
                for r in pq.read_table(f).to_pylist()]
        assert not [r for r in rows if (r["error"] or "").startswith("write failed")]
        assert len(rows) < len(rels), "the small volume did not fill"
        _remount(enhanced, "64m")
        code2, _, err2 = cli.run(prefect_api=harness_api)
        assert code2 == 0, err2[-2000:]
        _check_local_exactly_once(out, rels, run_id, all_ok=True)
    finally:
        _umount(enhanced)


# ============================================================================ more defects

def test_markers_without_parquet_are_not_done(tmp_path, prefect_harness, mlflow_sqlite):
    import shutil

    from flows.enhance import run_enhance
    from varlide.config import Config

    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 12)
    cfg = Config(**FAST, shard_size=4)
    first = run_enhance(str(inp), str(out), cfg)
    assert first["complete"]
    shutil.rmtree(out / "scores")  # the state a --fresh killed after its first delete leaves
    run_enhance(str(inp), str(out), cfg)
    _check_local_exactly_once(out, rels)


def test_crash_temp_files_are_cleaned_on_resume(tmp_path, prefect_harness, mlflow_sqlite):
    from flows.enhance import run_enhance
    from varlide.config import Config

    inp, out = tmp_path / "in" / "night", tmp_path / "out"
    rels = _local_corpus(inp, 8)
    cfg = Config(**FAST, shard_size=4)
    summary = run_enhance(str(inp), str(out), cfg, fresh=False)
    run_id = summary["run_id"]
    scores = out / "scores" / "night" / run_id
    # what a SIGKILL between open() and os.replace() in write_bytes leaves: a hidden temp of
    # a shard that is then not done (its marker is removed to match)
    (scores / ".shard-00001.parquet.tmp-0badf00d").write_bytes(b"PAR1 half a file")
    (out / "runs" / run_id / "done" / "shard-00001.json").unlink()
    (scores / "shard-00001.parquet").unlink()
    assert run_enhance(str(inp), str(out), cfg)["complete"]
    _check_local_exactly_once(out, rels)
    leftovers = sorted(p.name for p in out.rglob(".*tmp-*"))
    assert not leftovers, leftovers


def test_faultproxy_only_on_loopback_and_counts(s3_server):
    """The proxy itself: loopback only, every kind counted, the request sequence seeded."""
    import urllib.error
    import urllib.request

    with FaultProxy(s3_server, slowdown=0.25, internal_error=0.25, reset=0.25, delay=0.25,
                    delay_s=(0.0, 0.01), seed=1) as proxy:
        assert proxy.url.startswith("http://127.0.0.1:")
        for conn in psutil.Process().net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == proxy.port:
                assert conn.laddr.ip == "127.0.0.1"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        outcomes = []
        for _ in range(80):
            try:
                with opener.open(f"{proxy.url}/", timeout=10) as r:
                    r.read()
                    outcomes.append(r.status)
            except urllib.error.HTTPError as exc:
                outcomes.append(exc.code)
                assert b"<Code>" in exc.read()
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append(type(exc).__name__)
        stats = proxy.summary()
    assert stats["requests"] == 80
    assert all(proxy.counts[k] > 0 for k in ("slowdown", "internal_error", "reset", "delay"))
    assert outcomes.count(503) == proxy.counts["slowdown"]
    assert outcomes.count(500) == proxy.counts["internal_error"]
    assert stats["forwarded"] == 80 - proxy.counts["slowdown"] - proxy.counts["internal_error"]


def test_soak_script_is_importable():
    """benchmarks/soak.py stays importable (its run is the long version of this file)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and "--images" in r.stdout, r.stderr
