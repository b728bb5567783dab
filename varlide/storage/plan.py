"""Shard plans: consecutive chunks of the listing, stored in the run manifest.

A resumed run uses the plan stored in its manifest (``plan_from_json``), never a new
listing, so shard ``i`` always holds the same files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_OPTIONAL = ("out_rel_path", "out_format", "out_error", "unread")


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One input file of a plan and, when decided up front, its enhanced output name.

    Slots, and ``out_rel_path`` the very string of ``rel_path`` when they are equal: a
    1,000,000-file plan is held in ~150 MB (benchmarks/planning.py).

    ``out_error`` is set when no output name can be used (e.g. a collision a format change
    would cause); the file still gets an error row, never an overwrite.

    ``unread`` is set for an entry the listing refused to read (a FIFO, a link out of the
    input root, an object key that escapes its prefix, a folder that cannot be listed): it
    is never opened, and gets an error row that says why, so every entry has a status.
    """

    rel_path: str
    size: int
    out_rel_path: str | None = None
    out_format: str | None = None
    out_error: str | None = None
    unread: str | None = None


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    files: tuple[PlannedFile, ...]


def plan_shards(files: Sequence[PlannedFile], shard_size: int) -> list[Shard]:
    """Consecutive chunks of ``shard_size`` files in listing order; indices from 0."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    files = tuple(files)
    return [
        Shard(index=i, files=files[start:start + shard_size])
        for i, start in enumerate(range(0, len(files), shard_size))
    ]


def _file_to_json(f: PlannedFile) -> list[Any]:
    """A file as a compact row ``[rel_path, size, out_rel_path, out_format, out_error,
    unread]``:
    ``out_rel_path`` is ``""`` when it equals ``rel_path`` (the common case), trailing
    nulls are dropped. A 1,000,000-file plan is ~45 MB of JSON this way (dicts with keys:
    ~130 MB, and ~3x the memory to write and read back)."""
    out_rel = "" if f.out_rel_path == f.rel_path else f.out_rel_path
    row: list[Any] = [f.rel_path, f.size, out_rel, f.out_format, f.out_error, f.unread]
    while len(row) > 2 and row[-1] is None:
        row.pop()
    return row


def plan_to_json(shards: Iterable[Shard]) -> list[dict[str, Any]]:
    """JSON-ready plan: ``[{"index": i, "files": [[rel_path, size, ...], ...]}]``."""
    return [{"index": s.index, "files": [_file_to_json(f) for f in s.files]} for s in shards]


def _file_from_json(f: Any) -> PlannedFile:
    if isinstance(f, dict):  # the form manifests had before rows (kept readable: resume)
        return PlannedFile(rel_path=str(f["rel_path"]), size=int(f["size"]),
                           **{k: f.get(k) for k in _OPTIONAL})
    if not isinstance(f, list | tuple) or not 2 <= len(f) <= 6:
        raise ValueError(f"expected a file row [rel_path, size, ...], got {f!r}")
    rel = str(f[0])
    out_rel, out_format, out_error, unread = (list(f[2:]) + [None] * 4)[:4]
    return PlannedFile(rel_path=rel, size=int(f[1]), out_rel_path=rel if out_rel == "" else
                       out_rel, out_format=out_format, out_error=out_error, unread=unread)


def plan_from_json(data: Iterable[dict[str, Any]]) -> list[Shard]:
    """Inverse of :func:`plan_to_json` (exact round trip; the older dict-per-file form is
    read too); a malformed plan is a ValueError."""
    shards: list[Shard] = []
    for pos, item in enumerate(data):
        try:
            index = int(item["index"])
            files = tuple(_file_from_json(f) for f in item["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed shard plan entry #{pos}: {exc!r}") from None
        shards.append(Shard(index=index, files=files))
    indices = [s.index for s in shards]
    if len(set(indices)) != len(indices):
        raise ValueError("malformed shard plan: duplicate shard indices")
    return shards
