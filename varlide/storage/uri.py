"""URIs through fsspec: one place that turns a URI into (filesystem, path) and joins keys.

Any fsspec URI works (a local path, ``file://``, ``s3://bucket/prefix``, ``memory://``). S3
settings come from the usual AWS variables; ``AWS_ENDPOINT_URL`` is passed to s3fs
explicitly so a private endpoint (MinIO, moto) works with every botocore version.
"""

from __future__ import annotations

import contextlib
import json
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
    """The fsspec filesystem for ``uri`` and the path inside it (credentials a
    :func:`hide_credentials` took out put back: the only place they are used)."""
    uri = reveal_credentials(uri)
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path


# ---- credentials in URIs ---------------------------------------------------------------
# ``ftp://user:secret@host/x`` given on the command line must reach the filesystem, and
# nothing else: not the manifest, Prefect's flow-run parameters, MLflow or a log line. The
# entry points hide the userinfo (``ftp://***@host/x``, the form ``tracking.redact`` writes)
# and keep it in this process' environment, keyed by scheme and host, so Dask worker
# processes started from here resolve it too; a run id does not change with a password.
CREDENTIALS_ENV = "VARLIDE_URI_CREDENTIALS"
HIDDEN_USERINFO = "***"
_USERINFO = re.compile(r"^(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^/@\s]+)@(?P<host>[^/\s]*)")


class HiddenCredentialsError(ValueError):
    """A URI whose credentials were hidden in another process (or never given)."""


def _credential_table() -> dict[str, str]:
    raw = os.environ.get(CREDENTIALS_ENV)
    return json.loads(raw) if raw else {}


def hide_credentials(uri: str) -> str:
    """``scheme://user:secret@host/x`` -> ``scheme://***@host/x``, the userinfo kept here."""
    match = _USERINFO.match(uri) if uri else None
    if match is None or match["user"] == HIDDEN_USERINFO:
        return uri
    table = _credential_table()
    table[match["scheme"] + match["host"]] = match["user"]
    os.environ[CREDENTIALS_ENV] = json.dumps(table)
    return f"{match['scheme']}{HIDDEN_USERINFO}@{uri[match.start('host'):]}"


def reveal_credentials(uri: str) -> str:
    """The URI :func:`hide_credentials` was given (unchanged when nothing is hidden)."""
    match = _USERINFO.match(uri) if "@" in uri else None
    if match is None or match["user"] != HIDDEN_USERINFO:
        return uri
    user = _credential_table().get(match["scheme"] + match["host"])
    if user is None:
        raise HiddenCredentialsError(
            f"{uri}: its credentials are not known to this process (pass the URI with its "
            f"user:password, or set {CREDENTIALS_ENV} where the worker runs)")
    return f"{match['scheme']}{user}@{uri[match.start('host'):]}"


_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relpath(rel: str) -> str:
    """Normalise a relative key and refuse one that would leave its root.

    Refused: empty, absolute (``/x``, ``\\x``), a drive (``C:x``), a URL (``s3://x``),
    any ``..`` component, a NUL character. A backslash is an ordinary character of the
    name, kept as it is: POSIX file names and S3 keys may hold one, and turning it into
    ``/`` would read ``a/b.png`` for the file ``a\\b.png`` and write both outputs to one
    name. A ``..`` between backslashes is refused all the same (a reader that splits on
    them must not escape either).
    """
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        raise UnsafePathError(f"refusing absolute or empty path {rel!r}")
    if "\x00" in rel or "://" in rel:
        raise UnsafePathError(f"refusing path with a NUL or a protocol: {rel!r}")
    if ".." in rel.replace("\\", "/").split("/"):
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
    """Whether ``fs`` is this machine's disk (the one place that decides it)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
