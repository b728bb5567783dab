"""URIs through fsspec: one place that turns a URI into (filesystem, path) and joins keys.

Any fsspec URI works (a local path, ``file://``, ``s3://bucket/prefix``, ``memory://``). S3
settings come from the usual AWS variables; ``AWS_ENDPOINT_URL`` is passed to s3fs
explicitly so a private endpoint (MinIO, moto) works with every botocore version.
"""

from __future__ import annotations

import os
import posixpath

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


def safe_relpath(rel: str) -> str:
    """Normalise a relative key and refuse one that would leave its root."""
    if not rel or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(f"refusing absolute or empty path {rel!r}")
    rel = rel.replace("\\", "/")
    parts = rel.split("/")
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"refusing path that escapes its root: {rel!r}")
    norm = posixpath.normpath(rel)
    if norm in (".", "") or norm.startswith("../"):
        raise UnsafePathError(f"refusing path that escapes its root: {rel!r}")
    return norm


def join(base: str, *rels: str) -> str:
    """Join safe relative keys onto a base URI (no escapes possible)."""
    out = base.rstrip("/")
    for rel in rels:
        out = f"{out}/{safe_relpath(rel)}"
    return out
