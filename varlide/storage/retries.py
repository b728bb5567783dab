"""Count the object-store request retries this process makes (botocore's and s3fs's own).

The retries happen inside botocore (legacy or standard retry mode) and s3fs's error wrapper,
which say so only in DEBUG records. ``install`` puts a filter on those three loggers that
counts the retry records and lets through only what the logger let through before, so no
DEBUG output appears that a user did not ask for. ``count`` is a process-wide total: a run
reports the difference over its shards (``ShardResult.store_retries``).
"""

from __future__ import annotations

import logging
import threading

# logger -> message prefixes that mean "this request is being retried"
_RETRY_RECORDS = {
    "botocore.retryhandler": ("Retry needed, action of",),
    "botocore.retries.standard": ("Retry needed, retrying request",),
    "s3fs": ("Retryable error", "Client error (maybe retryable)"),
}
# s3fs logs every ClientError as "maybe retryable" (a 404 too); it retries these
_S3FS_RETRIED_CLIENT_ERRORS = ("SlowDown", "reduce your request rate",
                               "XAmzContentSHA256Mismatch")

_lock = threading.Lock()
_count = 0
_installed = False


class _RetryCounter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...], passes: int) -> None:
        super().__init__()
        self.prefixes, self.passes = prefixes, passes

    def filter(self, record: logging.LogRecord) -> bool:
        global _count
        if _is_retry(record, self.prefixes):
            with _lock:
                _count += 1
        return record.levelno >= self.passes


def _is_retry(record: logging.LogRecord, prefixes: tuple[str, ...]) -> bool:
    msg = record.msg
    if not (isinstance(msg, str) and msg.startswith(prefixes)):
        return False
    if msg.startswith("Client error"):
        detail = " ".join(str(a) for a in record.args or ())
        return any(p in detail for p in _S3FS_RETRIED_CLIENT_ERRORS)
    return True


def install() -> None:
    """Start counting (idempotent). Lowers the three loggers to DEBUG; their filter keeps
    their former threshold for everything the records reach."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    for name, prefixes in _RETRY_RECORDS.items():
        logger = logging.getLogger(name)
        logger.addFilter(_RetryCounter(prefixes, logger.getEffectiveLevel()))
        logger.setLevel(logging.DEBUG)


def count() -> int:
    """Object-store request retries of this process since ``install``."""
    return _count
