"""Logging for every zchat process: stdlib ``logging`` to stderr, as text or JSON lines.

``setup_logging("INFO", "json")`` makes each record one JSON object on one line::

    {"ts": "2026-11-25T10:00:00.123456+00:00", "level": "INFO", "logger": "zchat.broker",
     "message": "listening", "bind": "tcp://127.0.0.1:5555"}

Fields passed with ``extra={...}`` are added to the object (and to the end of a text
line as ``key=value``), so ``log.info("stored", extra={"room": r, "seq": s})`` stays
machine-readable. Exceptions appear under ``exc``. An extra key may not be a
LogRecord attribute (``name``, ``msg``, ``args``, ``module``...): stdlib logging
raises KeyError for those, so say ``user=`` rather than ``name=``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
import sys
from typing import Any

from zchat.config import LOG_FORMATS, LOG_LEVELS, ConfigError

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_HANDLER_MARK = "_zchat_handler"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="microseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=_jsonable, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


class TextFormatter(logging.Formatter):
    """``2026-11-25T10:00:00.123Z INFO zchat.broker: listening bind=tcp://...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        line = f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z {record.levelname} {record.name}: {record.getMessage()}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return json.dumps(text, ensure_ascii=False) if (not text or any(c.isspace() or c in '"=' for c in text)) else text


#: Defaults of ``--log-file``: rotate at 10 MiB, keep 5 old files (60 MiB at most).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def setup_logging(
    level: str = "INFO", fmt: str = "text", log_file: str | None = None,
    max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
) -> None:
    """Send the root logger's records at ``level`` and above to stderr in ``fmt``; with
    ``log_file``, to that file instead, rotated at ``max_bytes`` with ``backups`` old
    files kept (FILE.1 the newest), so a long-running broker's logs stay bounded.

    Calling it again replaces zchat's handler rather than adding a second one.
    Raises ConfigError for an unknown level or format.
    """
    name = level.upper() if isinstance(level, str) else level
    if name == "WARN":
        name = "WARNING"
    if name not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    fmt = fmt.lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log format {fmt!r}: expected 'text' or 'json'")
    handler: logging.Handler
    if log_file:
        if max_bytes < 0 or backups < 0:
            raise ConfigError("log rotation wants max_bytes >= 0 and backups >= 0")
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(name)
    logging.captureWarnings(True)
