"""JSON-lines logging (SPEC §8).

Every line is one JSON object::

    {"timestamp": "2026-11-28T03:34:28.123456Z", "level": "INFO",
     "target": "empath.delivery.runner",
     "fields": {"message": "...", "component": "delivery", "message_id": "...", ...}}

Use :func:`get_logger` with a component name (smtp|delivery|dns|spool|control|
health|config) and pass event fields as keyword arguments::

    log = get_logger("delivery", __name__)
    log.info("Delivered", message_id=mid, domain=d, smtp_code="250", mx=host)
    log.audit("Message received", message_id=mid, sender=s)   # fields.audit = true

Field values must be JSON-serialisable (str/int/float/bool/None/lists).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Final

LEVEL_NAMES: Final = {
    logging.CRITICAL: "ERROR",
    logging.ERROR: "ERROR",
    logging.WARNING: "WARN",
    logging.INFO: "INFO",
    logging.DEBUG: "DEBUG",
    5: "TRACE",
}
TRACE: Final = 5
_CONFIG_LEVELS: Final = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}


def _rfc3339(ts: float) -> str:
    whole = int(ts)
    micros = int((ts - whole) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage()}
        extra = getattr(record, "empath_fields", None)
        if extra:
            fields.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            fields.setdefault("error", self.formatException(record.exc_info))
        return json.dumps(
            {
                "timestamp": _rfc3339(record.created),
                "level": LEVEL_NAMES.get(record.levelno, record.levelname),
                "target": record.name,
                "fields": fields,
            },
            ensure_ascii=False,
            default=str,
        )


class TextFormatter(logging.Formatter):
    """For a terminal: `time LEVEL target: message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, "empath_fields", None) or {}
        kv = " ".join(f"{k}={v}" for k, v in extra.items())
        line = (
            f"{_rfc3339(record.created)} {LEVEL_NAMES.get(record.levelno, record.levelname):5} "
            f"{record.name}: {record.getMessage()}"
        )
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return f"{line} {kv}" if kv else line


class EventLogger:
    """A thin wrapper over a stdlib logger that carries the component and event fields."""

    __slots__ = ("_component", "_logger")

    def __init__(self, component: str, logger: logging.Logger) -> None:
        self._component = component
        self._logger = logger

    def is_enabled(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def _log(self, level: int, message: str, fields: dict[str, Any], exc: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        fields["component"] = self._component
        self._logger.log(level, message, extra={"empath_fields": fields}, exc_info=exc)

    def trace(self, message: str, **fields: Any) -> None:
        self._log(TRACE, message, fields)

    def debug(self, message: str, **fields: Any) -> None:
        self._log(logging.DEBUG, message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log(logging.INFO, message, fields)

    def warn(self, message: str, **fields: Any) -> None:
        self._log(logging.WARNING, message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._log(logging.ERROR, message, fields)

    def exception(self, message: str, **fields: Any) -> None:
        """ERROR with the current exception's traceback in fields.error."""
        self._log(logging.ERROR, message, fields, exc=True)

    def audit(self, message: str, **fields: Any) -> None:
        """An audit event: INFO with fields.audit = true."""
        fields["audit"] = True
        self._log(logging.INFO, message, fields)


def get_logger(component: str, name: str) -> EventLogger:
    return EventLogger(component, logging.getLogger(name))


def setup_logging(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Configure the `empath` logger tree (called once by the composition root)."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("empath")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_CONFIG_LEVELS.get(level.lower(), logging.INFO))
    root.propagate = False


def set_level(level: str) -> None:
    logging.getLogger("empath").setLevel(_CONFIG_LEVELS.get(level.lower(), logging.INFO))
