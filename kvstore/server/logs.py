"""The server's log output: plain text lines, or one JSON object per line.

``log_format = "json"`` is for log collectors: every record is one line with
``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, the
traceback as ``exception`` when there is one, and any fields a call passes
with ``extra=`` (the start-up summary sends its listeners and tiers that way).
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from kvstore.config_toml import redact_urls
from kvstore.errors import InvalidConfig
from kvstore.ratelimit import RateLimitedWarning

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                             "asctime"}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # A password written into a URL (l3.url, l3.endpoint) never reaches
        # the log, whichever message carries it: ours, a library's, a traceback.
        return redact_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(self._document(record))

    def _document(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, default=str)


def configure(log_format: str, level: str) -> None:
    """Send every logger's records to stderr in ``log_format`` at ``level``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise InvalidConfig(f"log level {level!r} is not one of DEBUG, INFO, WARNING, "
                            "ERROR, CRITICAL (env KVSTORE_LOG_LEVEL)") from None
    root.addHandler(handler)


class AnswerNotDelivered(logging.Filter):
    """grpc.aio logs an ERROR with a traceback, per call, when a unary
    answer cannot be sent: the client went first (cancelled, past its
    deadline, refusing an answer over its receive limit), which any client
    can cause at will, or the answer was over the server's own message limit.
    Such records become one WARNING line at most per minute, naming the
    method and counting the others (a flood of tracebacks, before)."""

    _MARK = "ExecuteBatchError raised in core by servicer method"

    def __init__(self) -> None:
        super().__init__()
        self._warning = RateLimitedWarning(
            logging.getLogger("kvstore.server"),
            "an answer could not be sent (the client went first, or it was over a message "
            "size limit)", 60.0)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._MARK not in message:
            return True
        self._warning.note(message.rsplit(" ", 1)[-1].strip("[]"))
        return False


def quiet_undelivered_answers() -> None:
    """Install :class:`AnswerNotDelivered` on grpc's logger (once)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, AnswerNotDelivered) for f in grpc_log.filters):
        grpc_log.addFilter(AnswerNotDelivered())
