"""The run store: where a run's outputs, manifest, markers and lock live (DESIGN.md).

Layout under the output URI ``<out>`` (any fsspec URI)::

    <out>/scores/<dataset>/<run_id>/shard-NNNNN.parquet
    <out>/enhanced/<run_id>/<relative path>
    <out>/runs/<run_id>/manifest.json        input, effective config, shard plan
    <out>/runs/<run_id>/done/shard-NNNNN.json    written last, per shard
    <out>/runs/<run_id>/failed/shard-NNNNN.json  a shard that failed after its retries
    <out>/runs/<run_id>/history/shard-NNNNN.attempt-K.parquet  rows --retry-errors replaced
    <out>/runs/<run_id>/lock.json            held while a run is live

Departure from DESIGN.md ("the markers are the one source of truth for done"): a shard is
done when its marker *and* its Parquet exist (:meth:`RunStore.verified_done`). A marker
alone outlived its rows after a deleted ``scores/`` or an interrupted ``--fresh``, and the
run then reported 400 of 400 rows "complete" with none left; rows are what a run delivers.
A Parquet file whose size is not the one its marker recorded (truncated, overwritten) is
damaged: the shard is not done either. The check costs one listing of the run's scores
folder and one read of its markers.

JSON files are small and written whole: temp + rename on a local disk, one PUT remotely.
Reads drop fsspec's listing cache first, since another process may have written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from varlide.storage.jsonio import (
    dumps,
    fresh_fs,
    now_iso,
    read_json,
    rm_missing_ok,
    write_json,
)
from varlide.storage.runlock import RunLock, RunLockedError, lock_age  # noqa: F401  (re-exported)
from varlide.storage.uri import filesystem, is_local_fs, join, safe_relpath, write_bytes

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:05d}"
_SHARD_JSON = re.compile(r"^shard-(\d+)\.json$")
_SHARD_PARQUET = re.compile(r"^shard-(\d+)\.parquet$")


@dataclass
class DoneCheck:
    done: set[int]
    missing: list[int]  # marked done, no Parquet
    damaged: list[int]  # marked done, a Parquet of another size than the marker recorded

    @property
    def redo(self) -> list[int]:
        return sorted(self.missing + self.damaged)


def _single_component(value: str, what: str) -> str:
    """A run id or dataset name as one folder name; a backslash is refused too (a store or
    a tool that reads it as a separator would see two folders)."""
    norm = safe_relpath(value)
    if "/" in norm or "\\" in norm or norm != value:
        raise ValueError(f"{what} must be a single plain path component, got {value!r}")
    return norm


def _manifest_bytes(manifest: dict) -> bytes:
    """The manifest as indented JSON with its shard plan one compact line per shard: a
    million-file plan indented element by element would be ~3x larger and slower to write."""
    head = {k: v for k, v in manifest.items() if k != "plan"}
    if "plan" not in manifest:
        return dumps(head)
    shards = ",\n".join(json.dumps(s, separators=(",", ":"), allow_nan=False)
                        for s in manifest["plan"])
    text = json.dumps(head, indent=1, allow_nan=False)
    text = (text[:-2] + ",\n" if head else "{\n") + f' "plan": [\n{shards}\n ]\n}}'
    return text.encode()


class RunStore(RunLock):
    """Paths and small JSON records of one run under an output URI.

    The lock token lives on the instance: call :meth:`heartbeat` and :meth:`clear` on the
    instance that acquired the lock.
    """

    def __init__(self, output_uri: str, run_id: str):
        self.output_uri = output_uri
        self.run_id = _single_component(run_id, "run id")
        self.run_uri = join(output_uri, "runs", self.run_id)
        self._token: str | None = None
        self._lock_record: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RunStore({self.output_uri!r}, {self.run_id!r})"

    # ---- paths -------------------------------------------------------------------------
    @property
    def manifest_uri(self) -> str:
        return join(self.run_uri, "manifest.json")

    @property
    def lock_uri(self) -> str:
        return join(self.run_uri, "lock.json")

    @property
    def done_uri(self) -> str:
        return join(self.run_uri, "done")

    @property
    def failed_dir_uri(self) -> str:
        return join(self.run_uri, "failed")

    def marker_uri(self, shard: int) -> str:
        return join(self.done_uri, SHARD_NAME.format(_shard(shard)) + ".json")

    def failed_uri(self, shard: int) -> str:
        return join(self.failed_dir_uri, SHARD_NAME.format(_shard(shard)) + ".json")

    def scores_dir_uri(self, dataset: str) -> str:
        return join(self.output_uri, "scores", _single_component(dataset, "dataset"), self.run_id)

    def scores_uri(self, dataset: str, shard: int) -> str:
        """``<out>/scores/<dataset>/<run_id>/shard-NNNNN.parquet``."""
        return join(self.scores_dir_uri(dataset), SHARD_NAME.format(_shard(shard)) + ".parquet")

    @property
    def enhanced_root_uri(self) -> str:
        return join(self.output_uri, "enhanced", self.run_id)

    def enhanced_uri(self, rel_out: str) -> str:
        """``<out>/enhanced/<run_id>/<rel>``; UnsafePathError for ``..``/absolute paths."""
        return join(self.enhanced_root_uri, rel_out)

    # ---- manifest ----------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the run's manifest exists."""
        fs, path = fresh_fs(self.manifest_uri)
        return fs.exists(path)

    def write_manifest(self, manifest: dict) -> None:
        write_bytes(self.manifest_uri, _manifest_bytes(manifest))

    def read_manifest(self) -> dict:
        try:
            return read_json(self.manifest_uri)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run {self.run_id!r} has no manifest at {self.manifest_uri}"
            ) from None

    # ---- markers -----------------------------------------------------------------------
    def write_marker(self, shard: int, info: dict) -> None:
        """Mark a shard done (written last, after its Parquet); drops its failure marker."""
        record = {"shard": _shard(shard), "finished_at": now_iso(), **info}
        write_json(self.marker_uri(shard), record)
        rm_missing_ok(self.failed_uri(shard))

    def write_failure(self, shard: int, error: str) -> None:
        """Record that a shard failed after its retries (``failed/shard-NNNNN.json``)."""
        record = {
            "shard": _shard(shard),
            "error": str(error),
            "failed_at": now_iso(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        write_json(self.failed_uri(shard), record)

    def done_shards(self) -> set[int]:
        """Shard indices with a done marker (from the listing alone; no object reads)."""
        return set(_list_shard_files(self.done_uri))

    def read_markers(self) -> dict[int, dict]:
        return _read_shard_files(self.done_uri)

    def read_marker(self, shard: int) -> dict | None:
        """One shard's done marker, or None when it has none."""
        fs, path = fresh_fs(self.marker_uri(shard))
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None

    def read_failures(self) -> dict[int, dict]:
        return _read_shard_files(self.failed_dir_uri)

    def parquet_shards(self, dataset: str) -> set[int]:
        """Shard indices whose Parquet file exists (one listing of the run's scores folder)."""
        return set(self.parquet_sizes(dataset))

    def parquet_sizes(self, dataset: str) -> dict[int, int]:
        """{shard index: bytes} of the run's Parquet files (one listing, no reads)."""
        entries = _list_shard_entries(self.scores_dir_uri(dataset), _SHARD_PARQUET)
        return {i: int(e.get("size") or 0) for i, e in entries.items()
                if e.get("type") != "directory"}

    def check_done(self, dataset: str,
                   markers: dict[int, dict] | None = None) -> DoneCheck:
        """Which marked shards are done, and which are not because their Parquet is missing
        or damaged (a size other than the one the marker recorded). A marker alone never
        means done: its rows are what the run delivers."""
        markers = self.read_markers() if markers is None else markers
        if not markers:
            return DoneCheck(set(), [], [])
        sizes = self.parquet_sizes(dataset)
        missing = sorted(i for i in markers if i not in sizes)
        damaged = sorted(i for i, m in markers.items() if i in sizes
                         and m.get("parquet_bytes") is not None
                         and int(m["parquet_bytes"]) != sizes[i])
        return DoneCheck(set(markers) - set(missing) - set(damaged), missing, damaged)

    def verified_done(self, dataset: str) -> tuple[set[int], list[int]]:
        """``(done, redo)``: shards done (see :meth:`check_done`), and the sorted marked
        shards whose Parquet is missing or damaged."""
        check = self.check_done(dataset)
        return check.done, check.redo

    def history_uri(self, shard: int, attempt: int) -> str:
        """``runs/<run_id>/history/shard-NNNNN.attempt-K.parquet``: a replaced attempt."""
        name = SHARD_NAME.format(_shard(shard)) + f".attempt-{int(attempt)}.parquet"
        return join(self.run_uri, "history", name)

    def keep_attempt(self, dataset: str, shard: int, attempt: int) -> str:
        """Copy a shard's current Parquet to its history before a retry replaces it.

        Never overwrites: a retry that crashed after this step and runs again keeps the
        first copy, which is the attempt's true rows."""
        target = self.history_uri(shard, attempt)
        fs, path = fresh_fs(target)
        if not fs.exists(path):
            src_fs, src = fresh_fs(self.scores_uri(dataset, shard))
            write_bytes(target, src_fs.cat_file(src))
        return target

    def remove_temp_files(self, dataset: str) -> list[str]:
        """Delete the hidden temps (``.name.tmp-xxxxxxxx``) a killed writer left in the
        run's records and scores folders; call holding the lock. Local disks only (object
        stores are written in one PUT). The enhanced tree is not walked (it can hold
        millions of files): its temps are hidden from readers and are overwritten names."""
        removed: list[str] = []
        for uri in (self.run_uri, self.scores_dir_uri(dataset)):
            fs, root = fresh_fs(uri)
            if not is_local_fs(fs) or not os.path.isdir(root):
                continue
            for folder, _dirs, names in os.walk(root):
                for name in names:
                    if _TEMP_NAME.fullmatch(name):
                        path = os.path.join(folder, name)
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(path)
                            removed.append(path)
        return removed

    def drop_marker(self, shard: int) -> None:
        """Remove a shard's done marker, so the next run redoes it."""
        rm_missing_ok(self.marker_uri(shard))

    def remove_parquet(self, dataset: str, shard: int) -> None:
        """Remove a shard's Parquet file (a damaged one; drop its marker first)."""
        rm_missing_ok(self.scores_uri(dataset, shard))

    # ---- fresh start -------------------------------------------------------------------
    def clear(self, dataset: str, stale_after_s: float = 6 * 3600) -> None:
        """Delete the run's records, scores and enhanced images (``--fresh``).

        Order matters for a crash half-way: the done/failed markers and the manifest go
        first, the Parquet and images last, so an interrupted clear never leaves a "done"
        marker whose rows are gone (the rerun would report the run complete with no rows).

        Keeps a lock this instance holds (acquire it first); refuses with RunLockedError
        while another process holds a live one. A stale lock is deleted with the rest.
        """
        self._refuse_live_lock(stale_after_s)
        for uri in (self.done_uri, self.failed_dir_uri):
            _rm_tree(uri)
        rm_missing_ok(self.manifest_uri)
        self._clear_run_records()
        for uri in (self.scores_dir_uri(dataset), self.enhanced_root_uri):
            _rm_tree(uri)

    def has_outputs(self, dataset: str) -> bool:
        """True when markers or Parquet of this run id exist (e.g. left by a crashed clear)."""
        return bool(self.done_shards() or self.parquet_shards(dataset))

    def _refuse_live_lock(self, stale_after_s: float) -> None:
        if self._token is not None:
            return
        holder = self.read_lock()
        if holder is not None:
            age = lock_age(holder)
            if age is None or age <= stale_after_s:
                raise self._locked_error(holder, age, stale_after_s)

    def _clear_run_records(self) -> None:
        """Everything left under ``runs/<run_id>/`` except the lock this instance holds."""
        fs, run_path = fresh_fs(self.run_uri)
        if not fs.exists(run_path):
            return
        _, lock_path = filesystem(self.lock_uri)
        keep = {lock_path} if self._token is not None else set()
        victims = [p for p in fs.find(run_path) if p not in keep]
        if victims:
            fs.rm(victims)
        fs.invalidate_cache(run_path)
        if is_local_fs(fs):  # drop the now empty folders (object stores have none)
            for root, dirs, _files in os.walk(run_path, topdown=False):
                for d in dirs:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(root, d))
            if not keep:
                with contextlib.suppress(OSError):
                    os.rmdir(run_path)


def _rm_tree(uri: str) -> None:
    fs, path = fresh_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{8}")  # storage.uri.write_bytes' local temps


def _shard(shard: int) -> int:
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard index must be an integer >= 0, got {shard!r}")
    return shard


def _list_shard_entries(dir_uri: str, pattern: re.Pattern = _SHARD_JSON) -> dict[int, dict]:
    """{shard index: listing entry (name, size, type)} of the ``shard-NNNNN.json`` (or
    ``pattern``) files in a folder: one listing."""
    fs, path = fresh_fs(dir_uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[int, dict] = {}
    for entry in entries:
        m = pattern.match(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if m:
            out[int(m.group(1))] = entry
    return out


def _list_shard_files(dir_uri: str, pattern: re.Pattern = _SHARD_JSON) -> dict[int, str]:
    """{shard index: path} of the ``shard-NNNNN.json`` (or ``pattern``) files in a folder."""
    return {i: e["name"] for i, e in _list_shard_entries(dir_uri, pattern).items()}


def _read_shard_files(dir_uri: str) -> dict[int, dict]:
    found = _list_shard_files(dir_uri)
    if not found:
        return {}
    fs, _ = filesystem(dir_uri)
    blobs = fs.cat(list(found.values()), on_error="omit")  # concurrent on object stores
    out: dict[int, dict] = {}
    for index, path in sorted(found.items()):
        blob = blobs.get(path)
        if blob is None:
            continue  # deleted between listing and reading
        try:
            out[index] = json.loads(blob)
        except ValueError:
            log.warning("ignoring unreadable marker %s", path)
    return out


def list_run_ids(output_uri: str) -> list[str]:
    """Run ids under ``<out>/runs/`` that have a manifest, sorted."""
    runs_uri = join(output_uri, "runs")
    fs, path = fresh_fs(runs_uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    ids = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        run_id = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if not run_id or run_id.startswith("."):
            continue
        if RunStore(output_uri, run_id).exists():
            ids.append(run_id)
    return sorted(ids)


@dataclass
class RunStatus:
    """Where a run stands, from its manifest, markers and the Parquet files they vouch for."""

    run_id: str
    dataset: str | None
    input_uri: str | None
    shards_total: int
    done: list[int] = field(default_factory=list)  # a marker and its Parquet file
    failed: list[int] = field(default_factory=list)  # failed and not done since
    pending: list[int] = field(default_factory=list)  # not done and not failed
    rows: int = 0  # sum of the done markers' "rows"
    errors: int = 0  # sum of the done markers' "errors"
    images: int = 0  # files in the plan
    created_at: str | None = None
    # marked done but its Parquet is gone (also in ``pending``: the next run redoes them)
    missing_parquet: list[int] = field(default_factory=list)
    # marked done but its Parquet's size is not the marker's (also in ``pending``)
    damaged_parquet: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.pending and not self.failed


def run_status(output_uri: str, run_id: str) -> RunStatus:
    """Status of a run from its manifest, markers and Parquet listing (FileNotFoundError if
    no manifest). A marker whose Parquet file is missing does not count as done."""
    store = RunStore(output_uri, run_id)
    manifest = store.read_manifest()
    plan = manifest.get("plan") or []
    indices = sorted(int(s["index"]) for s in plan)
    markers = store.read_markers()
    check = (store.check_done(manifest["dataset"], markers) if manifest.get("dataset")
             else DoneCheck(set(), sorted(markers), []))
    missing = [i for i in indices if i in check.missing]
    damaged = [i for i in indices if i in check.damaged]
    markers = {i: m for i, m in markers.items() if i in check.done}
    failures = store.read_failures()
    done = [i for i in indices if i in markers]
    failed = [i for i in indices if i in failures and i not in markers]
    pending = [i for i in indices if i not in markers and i not in failed]
    return RunStatus(
        run_id=run_id,
        dataset=manifest.get("dataset"),
        input_uri=manifest.get("input_uri"),
        shards_total=len(indices),
        done=done,
        failed=failed,
        pending=pending,
        rows=sum(int(markers[i].get("rows") or 0) for i in done),
        errors=sum(int(markers[i].get("errors") or 0) for i in done),
        images=sum(len(s.get("files") or ()) for s in plan),
        created_at=manifest.get("created_at"),
        missing_parquet=missing,
        damaged_parquet=damaged,
    )
