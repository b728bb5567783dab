"""The run lock: one live run per run id, across processes and hosts (DESIGN.md).

``runs/<run_id>/lock.json`` is created exclusively (``O_CREAT | O_EXCL`` on a local disk, a
conditional PUT on an object store, then read back), refreshed by a heartbeat, released by
its holder only, taken over when its holder is dead on this host or its heartbeat is stale.
:class:`RunLock` is the protocol; :class:`varlide.storage.runstore.RunStore` has it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from varlide.storage.jsonio import dumps, now_iso, read_json, rm_missing_ok, write_json
from varlide.storage.uri import filesystem, is_local_fs

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another live run holds the run's lock; the message names the holder and the lock."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None, lock_uri: str = ""):
        super().__init__(message)
        self.holder = holder or {}
        self.lock_uri = lock_uri


def holder_is_dead(holder: dict[str, Any]) -> bool:
    """True when the lock's holder ran on this host and its process is gone (a crash).

    A re-run after a crash must not wait for the heartbeat to go stale; on other hosts we
    cannot tell, so only the heartbeat decides there.
    """
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lock_age(holder: dict, fs=None, path: str | None = None) -> float | None:
    """Seconds since the lock's last heartbeat (None when unknown)."""
    ts = holder.get("heartbeat_ts") or holder.get("mtime")
    if ts is None and holder.get("heartbeat"):
        try:
            ts = datetime.fromisoformat(holder["heartbeat"]).timestamp()
        except (TypeError, ValueError):
            ts = None
    if ts is None and fs is not None and path is not None:
        with contextlib.suppress(Exception):
            ts = fs.modified(path).timestamp()
    return None if ts is None else max(0.0, time.time() - float(ts))



class RunLock:
    """The lock protocol of a run store: needs ``run_id`` and ``lock_uri``; holds
    ``_token`` and ``_lock_record`` while the lock is ours."""

    run_id: str
    _token: str | None = None
    _lock_record: dict[str, Any] | None = None

    @property
    def lock_uri(self) -> str:
        raise NotImplementedError

    @property
    def holds_lock(self) -> bool:
        return self._token is not None

    def read_lock(self) -> dict | None:
        """The current lock record, or None when there is none."""
        try:
            return read_json(self.lock_uri)
        except FileNotFoundError:
            return None

    def _new_lock_record(self, owner: str | None) -> dict[str, Any]:
        host = socket.gethostname()
        pid = os.getpid()
        now = time.time()
        since = now_iso()
        return {
            "run_id": self.run_id,
            "owner": owner or f"{host}:{pid}",
            "host": host,
            "pid": pid,
            "token": uuid.uuid4().hex,
            "since": since,
            "heartbeat": since,
            "heartbeat_ts": now,
        }

    def _locked_error(self, holder: dict[str, Any], age: float | None, stale_after_s: float):
        age_s = "unknown" if age is None else f"{age:.0f}s ago"
        return RunLockedError(
            f"run {self.run_id!r} is locked by {holder.get('owner', '?')} "
            f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {holder.get('since', '?')}, last heartbeat {age_s}); lock: {self.lock_uri}. "
            f"If that run is dead, the lock goes stale after {stale_after_s:.0f}s without a "
            f"heartbeat, or delete the lock object.",
            holder=holder,
            lock_uri=self.lock_uri,
        )

    def acquire(self, owner: str | None = None, stale_after_s: float = 6 * 3600) -> dict:
        """Take the run's lock; RunLockedError if another live run holds it.

        A lock whose heartbeat is older than ``stale_after_s`` is taken over (a warning is
        logged). Returns the lock record written.

        Local disks: the lock file is created with ``O_CREAT | O_EXCL``, so two processes
        cannot both create it; a stale lock is renamed aside (atomic) and checked to be the
        stale one before a new one is created. Object stores: the lock is created with a
        conditional PUT (``If-None-Match: *``; AWS S3, MinIO and moto honour it) and then
        read back and its token compared, which also catches a store that ignores the
        condition. Remaining race: two processes taking over the *same stale* lock on an
        object store at the same moment may both read back their own token (PUT A, read A,
        PUT B, read B); and a store that ignores the condition has the same window for a
        fresh lock. Both need two starts of one run id within a request's latency. Staleness
        compares wall clocks of different hosts, so keep ``stale_after_s`` far above skew.
        """
        if self._token is not None:
            raise RuntimeError(f"{self!r} already holds its lock {self.lock_uri}")
        fs, path = filesystem(self.lock_uri)
        local = is_local_fs(fs)
        for _attempt in range(3):
            record = self._new_lock_record(owner)
            data = dumps(record)
            if self._create_exclusive(fs, path, data, local):
                if not local and not self._readback_ok(record["token"]):
                    holder = self.read_lock() or {}
                    raise self._locked_error(holder, lock_age(holder), stale_after_s)
                self._token, self._lock_record = record["token"], record
                return record
            holder = self._read_lock_retrying(fs, path)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.get("token") == record["token"]:
                # our own PUT landed but its response was lost; the client's retry of it was
                # refused by the condition: the lock is ours
                self._token, self._lock_record = record["token"], record
                return record
            age = lock_age(holder, fs=fs, path=path)
            if age is not None and age <= stale_after_s and not holder_is_dead(holder):
                raise self._locked_error(holder, age, stale_after_s)
            log.warning(
                "taking over stale lock %s held by %s (host %s, pid %s, last heartbeat %s)",
                self.lock_uri, holder.get("owner"), holder.get("host"), holder.get("pid"),
                holder.get("heartbeat"),
            )
            if local:
                if not self._remove_stale_local(path, holder):
                    holder = self.read_lock() or holder
                    raise self._locked_error(holder, lock_age(holder), stale_after_s)
                continue  # now create it exclusively
            fs.pipe_file(path, data)
            fs.invalidate_cache(path)
            if not self._readback_ok(record["token"]):
                holder = self.read_lock() or {}
                raise self._locked_error(holder, lock_age(holder), stale_after_s)
            self._token, self._lock_record = record["token"], record
            return record
        holder = self.read_lock() or {}
        raise self._locked_error(holder, lock_age(holder), stale_after_s)

    @staticmethod
    def _create_exclusive(fs, path: str, data: bytes, local: bool) -> bool:
        """Create ``path`` only if absent; False when it exists."""
        if local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        fs.invalidate_cache(path)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a backend without exclusive create
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return True

    def _readback_ok(self, token: str) -> bool:
        current = self.read_lock()
        return bool(current) and current.get("token") == token

    def _read_lock_retrying(self, fs, path: str) -> dict | None:
        """Read an existing lock; a half-written local one is retried briefly."""
        for _ in range(20):
            try:
                return read_json(self.lock_uri)
            except FileNotFoundError:
                return None
            except ValueError:  # being written (local O_EXCL create, then write)
                time.sleep(0.05)
        # Unreadable for a second: judge it by its modification time.
        return {"owner": "unknown (unreadable lock)", "mtime": fs.modified(path).timestamp()}

    def _remove_stale_local(self, path: str, stale: dict) -> bool:
        """Move the stale lock aside atomically; False if a live one replaced it meanwhile."""
        aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True  # someone else removed it; we race on the O_EXCL create next
        try:
            with open(aside, "rb") as fh:
                moved = json.loads(fh.read() or b"{}")
        except ValueError:
            moved = {}
        if moved.get("token") != stale.get("token"):
            # We moved a fresh lock someone just created: put it back (no clobber).
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def release(self) -> None:
        """Delete the lock if it is still ours (a taken-over lock is left alone)."""
        token, self._token, self._lock_record = self._token, None, None
        if token is None:
            return
        current = self.read_lock()
        if current is None:
            log.warning("lock %s was already gone at release", self.lock_uri)
            return
        if current.get("token") != token:
            log.warning(
                "lock %s was taken over by %s (host %s, pid %s); leaving it",
                self.lock_uri, current.get("owner"), current.get("host"), current.get("pid"),
            )
            return
        rm_missing_ok(self.lock_uri)

    def abandon(self) -> None:
        """Give up the lock without deleting it: for a process that exits while work it
        started may still write. The lock names this (dead) pid, so a run on this host
        takes it over at once; elsewhere it goes stale."""
        self._token, self._lock_record = None, None

    @contextlib.contextmanager
    def lock(
        self, owner: str | None = None, stale_after_s: float = 6 * 3600
    ) -> Iterator[dict]:
        """``with store.lock(): ...`` acquires the run's lock and releases it on exit."""
        record = self.acquire(owner=owner, stale_after_s=stale_after_s)
        try:
            yield record
        finally:
            self.release()

    def heartbeat(self) -> None:
        """Refresh the held lock's heartbeat; RunLockedError if it was taken over.

        A no-op when this instance holds no lock (e.g. a run started without one).
        """
        if self._token is None or self._lock_record is None:
            return
        current = self.read_lock()
        if current is None or current.get("token") != self._token:
            holder = current or {}
            self._token, self._lock_record = None, None
            raise RunLockedError(
                f"lost the lock of run {self.run_id!r} ({self.lock_uri}): "
                + (
                    f"now held by {holder.get('owner')} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {holder.get('since')})"
                    if holder else "it was deleted"
                ),
                holder=holder,
                lock_uri=self.lock_uri,
            )
        record = {**self._lock_record, "heartbeat": now_iso(), "heartbeat_ts": time.time()}
        write_json(self.lock_uri, record)
        self._lock_record = record
