"""Moving weight files: ``pull`` (from each file's source or a hub), ``mirror`` (the cache +
lock to a bucket or folder), ``sync`` (a worker's cache from a mirror), ``verify``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from varlide.weights.files import (
    HF_BASE,
    LOCK_NAME,
    Requirement,
    WeightFile,
    WeightsError,
    hf_mark_main,
    location_path,
)
from varlide.weights.lock import (
    CHUNK,
    LOCK_FORMAT,
    read_lock,
    record,
    sha256_file,
    update_lock,
)


def _copy_to_local(src_uri: str, dest: Path, expect_sha: str | None = None,
                   what: str = "") -> tuple[int, str]:
    """Stream any fsspec URI or http(s) URL into ``dest`` (temp + rename), hashing on the
    way; a checksum mismatch leaves nothing behind and names the file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    h, size = hashlib.sha256(), 0
    try:
        with _open_source(src_uri) as src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        digest = h.hexdigest()
        if expect_sha and not digest.startswith(expect_sha):
            raise WeightsError(f"{what or dest}: sha256 {digest[:12]} of the copy from {src_uri} "
                               f"does not match the expected {expect_sha[:12]}; not installed")
        os.replace(tmp, dest)
        return size, digest
    finally:
        if tmp.exists():
            tmp.unlink()

@contextlib.contextmanager
def _open_source(uri: str):
    if uri.startswith(("http://", "https://")):
        import urllib.request

        req = urllib.request.Request(uri, headers={"User-Agent": "varlide-weights"})
        token = os.environ.get("HF_TOKEN")
        if token and uri.startswith(HF_BASE):
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            yield resp
        return
    from varlide.storage.uri import filesystem

    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        yield fh

def _put(local: Path, uri: str) -> None:
    from varlide.storage.uri import filesystem, is_local_fs

    fs, path = filesystem(uri)
    if is_local_fs(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), path)

def _join(base: str, key: str) -> str:
    from varlide.storage.uri import join

    return join(base, key)

@dataclass
class Action:
    key: str
    path: str
    what: str  # 'present' / 'pulled' / 'synced' / 'mirrored' / 'failed' ...
    detail: str = ""

def pull(reqs: Iterable[Requirement], hub: str | None = None,
         progress: bool = True) -> list[Action]:
    """Download every missing file (from ``hub``/<key> when given, else its source), then
    record size and sha256 of every present one in the lock file."""
    out: list[Action] = []
    done: list[WeightFile] = []
    reqs = list(reqs)
    for i, r in enumerate(reqs):
        wf = r.file
        if progress:
            print(f"[{i + 1}/{len(reqs)}] {wf.key or wf.location}", file=sys.stderr)
        if wf.present():
            out.append(Action(wf.key or wf.location, str(wf.path()), "present"))
            done.append(wf)
            continue
        src = _join(hub, wf.key) if hub and wf.key else wf.url
        if not src:
            out.append(Action(wf.key or wf.location, str(wf.path()),
                              "absent" if r.optional else "failed",
                              f"no download source: {wf.note or 'given by the user'}"))
            continue
        dest = location_path(wf.location, for_write=True)
        try:
            _copy_to_local(src, dest, wf.sha256, what=wf.key or wf.location)
        except Exception as exc:  # report and go on with the others
            out.append(Action(wf.key or wf.location, str(dest),
                              "absent" if r.optional else "failed",
                              f"{type(exc).__name__}: {exc}"))
            continue
        hf_mark_main(wf.location, dest)
        out.append(Action(wf.key or wf.location, str(dest), "pulled", src))
        done.append(wf)
    record(done)
    return out

def mirror(uri: str, reqs: Iterable[Requirement] = ()) -> list[Action]:
    """Copy every locked file (plus present ``reqs``, locked first) and the lock file to
    ``uri`` (a bucket prefix or a folder): the mirror that workers ``sync`` from."""
    record(r.file for r in reqs if r.file.key)
    lock = read_lock()
    out: list[Action] = []
    for key, entry in sorted(lock["files"].items()):
        path = location_path(entry["location"], entry.get("revision"))
        if not path.is_file():
            raise WeightsError(f"cannot mirror {key}: {path} is missing locally "
                               "(`varlide weights pull` first)")
        if path.stat().st_size != entry["size"]:
            raise WeightsError(f"cannot mirror {key}: {path} differs from the lock file "
                               "(`varlide weights verify`)")
        _put(path, _join(uri, key))
        out.append(Action(key, _join(uri, key), "mirrored"))
    from varlide.storage.uri import write_bytes

    write_bytes(_join(uri, LOCK_NAME), (json.dumps(lock, indent=1, sort_keys=True) + "\n").encode())
    return out

def read_remote_lock(uri: str) -> dict[str, Any]:
    from varlide.storage.uri import filesystem

    fs, p = filesystem(_join(uri, LOCK_NAME))
    try:
        data = json.loads(fs.cat_file(p))
    except FileNotFoundError:
        raise WeightsError(f"no {LOCK_NAME} at {uri}: not a weights mirror "
                           "(create it with `varlide weights mirror URI`)") from None
    if data.get("format") != LOCK_FORMAT:
        raise WeightsError(f"{uri}/{LOCK_NAME}: not a varlide weights lock file")
    return data

def sync(uri: str, keys: Iterable[str] | None = None) -> list[Action]:
    """Fill the local caches from a mirror: every file of its lock (or only ``keys``) that
    is absent or differs here is copied, checked against the lock's sha256, and put where
    its library looks; the local lock file gets the entries."""
    remote = read_remote_lock(uri)
    local = read_lock()["files"]
    wanted = None if keys is None else set(keys)
    out: list[Action] = []
    entries: dict[str, dict[str, Any]] = {}
    for key, entry in sorted(remote["files"].items()):
        if wanted is not None and key not in wanted:
            continue
        path = location_path(entry["location"], entry.get("revision"))
        if path.is_file() and path.stat().st_size == entry["size"] and (
                local.get(key, {}).get("sha256") == entry["sha256"]
                or sha256_file(path) == entry["sha256"]):
            out.append(Action(key, str(path), "present"))
            entries[key] = entry
            continue
        dest = location_path(entry["location"], entry.get("revision"), for_write=True)
        _copy_to_local(_join(uri, key), dest, entry["sha256"], what=key)
        hf_mark_main(entry["location"], dest)
        entries[key] = entry
        out.append(Action(key, str(dest), "synced"))
    if entries:
        update_lock(entries)
    return out

def verify(keys: Iterable[str] | None = None) -> list[Action]:
    """Re-hash every locked file (or ``keys``); an Action per file, ``what`` 'ok' or 'FAILED'
    with the reason (missing, size, sha256)."""
    lock = read_lock()
    wanted = None if keys is None else set(keys)
    out = []
    for key, entry in sorted(lock["files"].items()):
        if wanted is not None and key not in wanted:
            continue
        path = location_path(entry["location"], entry.get("revision"))
        if not path.is_file():
            out.append(Action(key, str(path), "FAILED", "missing"))
        elif path.stat().st_size != entry["size"]:
            out.append(Action(key, str(path), "FAILED",
                              f"size {path.stat().st_size} != locked {entry['size']}"))
        else:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                out.append(Action(key, str(path), "FAILED", f"sha256 {digest[:12]} != locked "
                                  f"{entry['sha256'][:12]} (corrupt or replaced)"))
            else:
                out.append(Action(key, str(path), "ok"))
    return out
