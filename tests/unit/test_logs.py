"""The server's log output (kvstore/server/logs.py): what grpc.aio logs for
an answer it could not send, and passwords in URLs."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from kvstore.server import logs


def _grpc_record(method: str) -> logging.LogRecord:
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        exc_info = sys.exc_info()
    return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx.pxi", 710,
                             "ExecuteBatchError raised in core by servicer method [%s]",
                             (method,), exc_info)


def test_an_undelivered_answer_is_one_warning_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """Any client can make grpc.aio log an ERROR with a traceback per call
    (cancel before the answer): the filter turns them into one WARNING a
    minute naming the method, counting the others; other records pass."""
    quiet = logs.AnswerNotDelivered()
    with caplog.at_level(logging.INFO, logger="kvstore.server"):
        kept = [quiet.filter(_grpc_record("/kvstore.v1.KVStore/GetSmall")) for _ in range(50)]
        assert kept == [False] * 50
        other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "x", 1,
                                  "something else failed", (), None)
        assert quiet.filter(other)
    lines = [r for r in caplog.records if r.name == "kvstore.server"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "/kvstore.v1.KVStore/GetSmall" in lines[0].getMessage()
    assert lines[0].exc_info is None


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_passwords_in_urls_are_redacted_in_every_line(log_format: str) -> None:
    formatter = logs.JsonFormatter() if log_format == "json" else logs.TextFormatter(
        logs.TEXT_FORMAT)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("kvstore.test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        # An AWS secret key may hold "/": it ended the redaction early.
        log.warning("GET http://minio:wJal/K7MD+x@127.0.0.1:9/b failed",
                    extra={"l3_endpoint": "https://u:pw@s3.example"})
        try:
            raise OSError("connect to http://user:Secret9@10.0.0.1:9000 refused")
        except OSError:
            log.exception("L3 down")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    for secret in ("wJal", "K7MD", "Secret9", ":pw@"):
        assert secret not in text, text
    assert "http://<redacted>@127.0.0.1:9/b" in text
