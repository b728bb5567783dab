"""The weights mechanism: every external file varlide can need, where it lives, its checksum.

GPU workers in a locked-down cluster cannot download, so weights are a managed input. This
package is the mechanism only and imports nothing of varlide but storage:

- ``files``: locations (``scheme:rest``, each where its library looks), ``WeightFile`` /
  ``Requirement``, the presence check and ``WeightsMissingError``;
- ``lock``: the lock file (size + sha256 of every fetched file);
- ``transfer``: ``pull`` / ``mirror`` / ``sync`` / ``verify``;
- ``offline``: offline by default, downloads blocked with a clear error.

Which files a run needs is the backends' data (``varlide.iqa.files``,
``varlide.priors.clip_files``, ``varlide.models.files``) put together by
``varlide.resolver`` (``requirements``, ``preflight``, ``prepare_worker``).

CLI: ``varlide weights list|pull|mirror URI|sync URI|verify``.
"""

from varlide.weights.files import (
    HF_BASE,
    LOCK_NAME,
    MIRRORABLE,
    Requirement,
    WeightFile,
    WeightsError,
    WeightsMissingError,
    cache_dir,
    check,
    dedupe,
    ensure_files,
    fetch_hint,
    hf_cache_dir,
    hf_file,
    location_key,
    location_path,
    lock_path,
    missing,
    package_dir,
    torch_hub_dir,
)
from varlide.weights.lock import (
    LOCK_FORMAT,
    lock_entry,
    read_lock,
    record,
    sha256_file,
    update_lock,
)
from varlide.weights.offline import OFFLINE_ENV, blocked_downloads, is_online, set_offline
from varlide.weights.transfer import Action, mirror, pull, read_remote_lock, sync, verify

__all__ = [
    "HF_BASE", "LOCK_FORMAT", "LOCK_NAME", "MIRRORABLE", "OFFLINE_ENV", "Action", "Requirement",
    "WeightFile", "WeightsError", "WeightsMissingError", "blocked_downloads", "cache_dir",
    "check", "dedupe", "ensure_files", "fetch_hint", "hf_cache_dir", "hf_file", "is_online",
    "location_key", "location_path", "lock_entry", "lock_path", "missing", "mirror",
    "package_dir", "pull", "read_lock", "read_remote_lock", "record", "set_offline",
    "sha256_file", "sync", "torch_hub_dir", "update_lock", "verify",
]
