"""The object-store retry count: botocore's and s3fs's retry records are counted, other
records are not, and counting adds no DEBUG output a user did not ask for."""

from __future__ import annotations

import logging

from varlide.storage import retries


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_retry_records_are_counted_and_not_shown():
    retries.install()
    retries.install()  # idempotent: one filter per logger
    seen = _Collect()
    root = logging.getLogger()
    root.addHandler(seen)
    try:
        before = retries.count()
        logging.getLogger("botocore.retryhandler").debug("Retry needed, action of: %s", 0.4)
        logging.getLogger("botocore.retries.standard").debug(
            "Retry needed, retrying request after delay of: %s", 0.1)
        s3fs = logging.getLogger("s3fs")
        s3fs.debug("Retryable error: %s", ConnectionResetError(104, "reset"))
        s3fs.debug("Client error (maybe retryable): %s",
                   Exception("An error occurred (SlowDown) when calling GetObject"))
        assert retries.count() == before + 4
        s3fs.debug("Client error (maybe retryable): %s",
                   Exception("An error occurred (404) when calling HeadObject: Not Found"))
        logging.getLogger("botocore.retryhandler").debug("No retry needed.")
        assert retries.count() == before + 4  # a 404 is not retried, nor a success
        ours = [r for r in seen.records if r.name.startswith(("botocore", "s3fs"))
                and r.levelno < logging.WARNING]
        assert ours == []  # counted, never printed
        s3fs.warning("a warning still reaches the handlers")
        assert [r.getMessage() for r in seen.records if r.name == "s3fs"] == [
            "a warning still reaches the handlers"]
    finally:
        root.removeHandler(seen)
