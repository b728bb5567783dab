"""Small JSON records written whole through the one writer, read fresh (another process
may have written since): the run store's and the run lock's files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from varlide.storage.uri import filesystem, write_bytes


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fresh_fs(uri: str):
    """(fs, path) with any cached listing for ``path`` dropped (another process may write)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return fs, path


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=False).encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, dumps(obj))


def read_json(uri: str) -> Any:
    fs, path = fresh_fs(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {uri}") from None
    return json.loads(data)


def rm_missing_ok(uri: str) -> None:
    fs, path = fresh_fs(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)
