"""URIs through fsspec: one place that turns a URI into (filesystem, path) and joins keys.

Any fsspec URI works (a local path, ``file://``, ``s3://bucket/prefix``, ``memory://``). S3
settings come from the usual AWS variables; ``AWS_ENDPOINT_URL`` is passed to s3fs
explicitly so a private endpoint (MinIO, moto) works with every botocore version.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid

import fsspec
from fsspec.core import url_to_fs


class UnsafePathError(ValueError):
    """A relative key would escape its root (``..``, absolute, empty)."""


def storage_options(uri: str) -> dict:
    """Per-protocol options read from the environment (never logged)."""
    if uri.startswith(("s3://", "s3a://")):
        opts: dict = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path


def is_local(uri: str) -> bool:
    fs, _ = filesystem(uri)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(rel: str) -> str:
    """Normalise a relative key and refuse one that would leave its root.

    Refused: empty, absolute (``/x``, ``\\x``), a drive (``C:x``), a URL (``s3://x``),
    any ``..`` component, a NUL character. Backslashes become ``/``.
    """
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        raise UnsafePathError(f"refusing absolute or empty path {rel!r}")
    if "\x00" in rel or "://" in rel:
        raise UnsafePathError(f"refusing path with a NUL or a protocol: {rel!r}")
    rel = rel.replace("\\", "/")
    parts = rel.split("/")
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"refusing path that escapes its root: {rel!r}")
    norm = posixpath.normpath(rel)
    if norm in (".", "") or norm.startswith("../"):
        raise UnsafePathError(f"refusing path that escapes its root: {rel!r}")
    return norm


def join(base: str, *rels: str) -> str:
    """Join safe relative keys onto a base URI (no escapes possible).

    Trailing slashes of ``base`` are dropped, except the ones that make a root:
    ``join("memory://", "a") == "memory://a"``, ``join("file:///", "a") == "file:///a"``,
    ``join("/", "a") == "/a"``.
    """
    head, sep, rest = base.partition("://")
    if not sep:
        head, rest = "", base
    else:
        head += sep
    stripped = rest.rstrip("/")
    if rest and not stripped:
        stripped = "/"  # a root such as "/" or the path of "file:///"
    out = head + stripped
    for rel in rels:
        rel = safe_relpath(rel)
        out = f"{out}{rel}" if (not out or out.endswith("/")) else f"{out}/{rel}"
    return out


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object whole: temp + rename on a local disk, a single PUT elsewhere.

    The local temp name is hidden (``.name.tmp-xxxx``) in the same folder, so a crash
    leaves nothing that readers pick up (pyarrow ignores dot files, ``*.parquet`` globs miss
    them). The one place that decides how varlide writes a file.
    """
    fs, path = filesystem(uri)
    if is_local_fs(fs):
        parent, _, name = path.rpartition("/")
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols
