"""Corpus listing: every image file under a folder/prefix, as sorted relative POSIX paths.

Works for any fsspec URI (a local path, ``file://``, ``s3://bucket/prefix``, ``memory://``).

Rules:
- recursive; only files whose extension (case-insensitive) is in ``IMAGE_EXTENSIONS``;
- anything hidden is skipped: a file or any folder on its path whose name starts with ``.``;
- directory placeholder objects (``key/`` on object stores) are skipped;
- the order is stable: sorted by ``rel_path`` (code-point order);
- ``include`` / ``exclude`` are :func:`fnmatch.fnmatchcase` globs (case-sensitive, like S3
  keys). A glob matches when it matches the whole relative path **or** the file's basename,
  so ``--include '*.png'`` keeps PNGs at every depth. In fnmatch ``*`` also crosses ``/``:
  ``night/*`` matches everything under ``night/``, at any depth, and ``*/night/*`` any
  ``night`` folder below the top level. A glob ending in ``/`` means "everything under that
  folder" (``night/`` is ``night/*``). With includes, a file is kept when any include
  matches; a file matching any exclude is dropped. ``limit`` is applied last (after sort
  and filters), so it always picks the same first files.

What is never read (each skipped with a warning, and reported to the caller through
``skipped``; a run gives each an error row that says why): an entry that is not a regular
file (a FIFO would block the reader forever, a device would stream without end), a symbolic
link whose target lies outside the input root (its target's bytes are not the corpus's), an
object key that would escape its prefix, and a folder below the root that cannot be listed
(its ``rel_path`` ends in ``/``; the root itself unlistable raises ``PermissionError``).
Names that would be one name on a case-insensitive filesystem are found by
:func:`fold_collisions`.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from varlide.storage.uri import filesystem, is_local_fs

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CorpusFile:
    """One input image: its path relative to the corpus root (POSIX) and size in bytes."""

    rel_path: str
    size: int


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """An entry the listing refused to list, and why (it gets no row: it is never read)."""

    rel_path: str
    reason: str


NOT_REGULAR = "not a regular file"
LINK_OUTSIDE = "symbolic link out of the input root (not followed)"
KEY_ESCAPES = "object key escapes the input prefix"
UNREADABLE_FOLDER = "folder cannot be listed"


def is_image_path(path: str) -> bool:
    """True when the path's extension is an image extension (case-insensitive)."""
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_hidden(rel_path: str) -> bool:
    """True when the file or any folder on its relative path starts with ``.``."""
    return any(part.startswith(".") for part in rel_path.split("/"))


def glob_matches(rel_path: str, pattern: str) -> bool:
    """A glob matches the whole relative path or its basename (see the module docstring)."""
    if pattern.endswith("/"):
        pattern += "*"
    if fnmatchcase(rel_path, pattern):
        return True
    return fnmatchcase(posixpath.basename(rel_path), pattern)


def keep_path(rel_path: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """The include/exclude decision for one relative path."""
    if include and not any(glob_matches(rel_path, p) for p in include):
        return False
    return not any(glob_matches(rel_path, p) for p in exclude)


def list_corpus(
    uri: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    limit: int | None = None,
    skipped: list[SkippedEntry] | None = None,
) -> list[CorpusFile]:
    """All image files under the folder/prefix ``uri``, sorted by relative path.

    ``skipped``, when given, receives the entries that match the filters but are never
    read (see the module docstring); each is also logged as a warning.
    Raises FileNotFoundError (naming the URI) when nothing exists there, and
    NotADirectoryError when ``uri`` is a single file: the input must be a folder/prefix.
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude must be sequences of globs, not a single string")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 (or None), got {limit}")
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    fs.invalidate_cache(root)  # another process may have written since we last listed
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {uri}")
    if fs.isfile(root):
        raise NotADirectoryError(
            f"input {uri} is a single file; it must be a folder (or an object-store prefix)"
        )
    refused: list[SkippedEntry] = []
    if is_local_fs(fs):
        wanted = _wanted(include, exclude)
        out = [CorpusFile(rel, size) for rel, size in _walk_local(root, wanted, refused)]
    else:
        out = _list_fsspec(fs, root, uri, include, exclude, refused)
    out.sort(key=lambda f: f.rel_path)
    if limit is not None:
        out = out[:limit]
    _warn_skipped(uri, refused)
    if skipped is not None:
        skipped.extend(sorted(refused, key=lambda e: e.rel_path))
    return out


def _wanted(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """The listing's filter on a relative path: visible, an image, kept by the globs."""

    def wanted(rel: str) -> bool:
        return not is_hidden(rel) and is_image_path(rel) and keep_path(rel, include, exclude)

    return wanted


def _warn_skipped(uri: str, refused: Sequence[SkippedEntry], shown: int = 10) -> None:
    """One warning per skipped entry, up to ``shown`` of them, then a count."""
    for entry in refused[:shown]:
        log.warning("skipping %s in %s: %s", entry.rel_path, uri, entry.reason)
    if len(refused) > shown:
        log.warning("skipped %d more entries in %s (not read, no row)", len(refused) - shown,
                    uri)


def _inside(path: str, real_root: str) -> bool:
    """True when ``path``, every link on it resolved, lies under ``real_root``."""
    target = os.path.realpath(path)
    return os.path.commonpath([target, real_root]) == real_root


def _walk_local(root: str, wanted: Callable[[str], bool] = lambda rel: True,
                skipped: list[SkippedEntry] | None = None) -> Iterator[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every wanted regular file under a local folder, by
    ``os.scandir``: what ``fs.find(detail=True)`` gives, without a dict of a dozen stat
    fields per file (1,000,000 files: ~900 MB of them). Entry types come from the
    directory listing itself (no extra stat per file); only symbolic links are resolved.

    Symbolic links: one whose target is outside the root is not followed (``skipped``);
    inside, a link to a file lists with its target's size, a link to a folder is walked
    only if that real folder is not walked already (so a folder is listed once and a link
    cycle cannot loop), and a broken link is listed with size 0 (its row then says it is
    unreadable). An entry that is not a regular file (FIFO, socket, device) is
    ``skipped``: reading it could block forever. An entry that cannot be examined is
    skipped with a warning. Hidden folders are not entered (nothing under them is listed)."""
    real_root = os.path.realpath(root)
    refused = skipped if skipped is not None else []
    seen: set[tuple[int, int]] = set()
    stack = [("", root)]
    while stack:
        rel_dir, path = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(path))
        except OSError as exc:
            if not rel_dir:  # the input itself: nothing can be planned
                raise PermissionError(exc.errno, f"cannot list the input folder: "
                                      f"{exc.strerror}", path) from exc
            refused.append(SkippedEntry(rel_dir, f"{UNREADABLE_FOLDER}: {exc.strerror}"))
            continue
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            try:
                if entry.is_symlink() and not _inside(entry.path, real_root):
                    if not is_hidden(rel) and (entry.is_dir() or wanted(rel)):
                        refused.append(SkippedEntry(rel, LINK_OUTSIDE))
                elif entry.is_dir():
                    if not entry.name.startswith("."):
                        stack.append((rel + "/", entry.path))
                elif not wanted(rel):
                    continue
                elif entry.is_file():
                    yield rel, entry.stat().st_size
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    yield rel, 0  # broken: listed (size 0) so its row says why
                else:
                    refused.append(SkippedEntry(rel, NOT_REGULAR))
            except OSError as exc:  # vanished, permission, a broken link
                log.warning("skipping %s: %s", entry.path, exc)


def _list_fsspec(fs, root: str, uri: str, include: Sequence[str], exclude: Sequence[str],
                 skipped: list[SkippedEntry] | None = None) -> list[CorpusFile]:
    """The listing on an object store (or any non-local fsspec filesystem): one ``find``."""
    wanted = _wanted(include, exclude)
    refused = skipped if skipped is not None else []
    found = fs.find(root, withdirs=False, detail=True)
    prefix = f"{root}/" if root else ""
    out: list[CorpusFile] = []
    for name, info in found.items():
        name = info.get("name", name)
        if info.get("type") == "directory" or name.endswith("/"):
            continue
        if not name.startswith(prefix):  # defensive: a backend returning other paths
            continue
        rel = name[len(prefix):]
        if ".." in rel.split("/") or rel.startswith("/"):
            # an object key that would escape its root: refused, loudly (never silently)
            refused.append(SkippedEntry(rel, KEY_ESCAPES))
            continue
        if rel and wanted(rel):
            out.append(CorpusFile(rel_path=rel, size=int(info.get("size") or 0)))
    return out


def _fold(name: str) -> str:
    return name.replace("\\", "/").casefold()


def fold_collisions(names: Iterable[str]) -> list[list[str]]:
    """Groups of distinct names that are ONE name on a case-insensitive filesystem (macOS,
    Windows) or where a backslash separates folders: ``A.png`` / ``a.png``, ``a\\b.png`` /
    ``a/b.png``. Written there, one would overwrite the other.

    Only names that change when folded can collide, so the common all-lowercase corpus
    costs one pass and no table."""
    names = names if isinstance(names, list) else list(names)
    candidates = {key for n in names if (key := _fold(n)) != n}
    if not candidates:
        return []
    groups: dict[str, list[str]] = {}
    for n in names:
        key = _fold(n)
        if key in candidates:
            groups.setdefault(key, []).append(n)
    return [g for g in groups.values() if len(g) > 1]
