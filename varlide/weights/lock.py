"""The lock file ``<varlide cache>/weights.lock.json``: for each file its key (the location
with the first ``:`` made a ``/``, also its path in a mirror), location, size, sha256, source
(and the hub revision). ``pull`` writes it, ``mirror`` copies it with the files, ``sync``
checks every file it fetches against it, ``verify`` re-hashes the local files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from varlide.weights.files import WeightFile, WeightsError, hf_repo_dir, lock_path, split_hf

LOCK_FORMAT = "varlide-weights-lock-1"

CHUNK = 1 << 20



@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path`` (several workers sync at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lck", "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here: best effort
            pass
        yield

def read_lock(path: Path | None = None) -> dict[str, Any]:
    path = path or lock_path()
    if not path.is_file():
        return {"format": LOCK_FORMAT, "files": {}}
    data = json.loads(path.read_text())
    if data.get("format") != LOCK_FORMAT:
        raise WeightsError(f"{path}: not a varlide weights lock file ({data.get('format')!r})")
    return data

def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)

def update_lock(entries: dict[str, dict[str, Any]], path: Path | None = None) -> dict[str, Any]:
    """Merge ``key -> entry`` into the local lock file (read-modify-write under a lock)."""
    path = path or lock_path()
    with _locked(path):
        lock = read_lock(path)
        lock["files"].update(entries)
        lock["updated_at"] = datetime.now(UTC).isoformat()
        _write_json_atomic(path, lock)
    return lock

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()

def lock_entry(wf: WeightFile, path: Path | None = None) -> dict[str, Any]:
    path = path or wf.path()
    entry = {"location": wf.location, "kind": wf.kind, "source": wf.url,
             "size": path.stat().st_size, "sha256": sha256_file(path)}
    if wf.location.startswith("hf:"):  # the snapshot it sits in: .../snapshots/<rev>/<file>
        repo, _ = split_hf(wf.location[3:])
        entry["revision"] = path.relative_to(hf_repo_dir(repo) / "snapshots").parts[0]
    return entry

def record(wfs: Iterable[WeightFile]) -> dict[str, Any]:
    """Add present files to the lock (size + sha256); returns the lock."""
    entries = {wf.key: lock_entry(wf) for wf in wfs if wf.key and wf.present()}
    return update_lock(entries)
