"""structlog set-up: readable console on a TTY, one JSON object per line otherwise.

Event names are ``noun.verb`` (``resync.start``, ``xdp.attach``, ``config.reject``):
one line per resync, per reload and per error; nothing is logged per packet,
and per route only at debug level. SIGHUP may change the level (``set_level``),
also for loggers bound already, so the level is a processor, not the wrapper.

Everything goes through the same processors and renderer: fibsync's own
structlog loggers, and the standard library's ``logging`` (asyncio, warnings,
libraries) through a ``ProcessorFormatter`` on the root logger, so a JSON log
never mixes in a plain-text line. When stderr is journald's stream (systemd
sets ``$JOURNAL_STREAM`` to its device and inode), every line starts with the
syslog priority as ``<N>`` (sd-daemon(3)): journald strips it and stores it, so
``journalctl -p err -u fibsync`` finds the errors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_METHOD_LEVELS = {**_LEVELS, "warn": logging.WARNING, "exception": logging.ERROR,
                  "critical": logging.CRITICAL, "fatal": logging.CRITICAL}
# syslog priorities (sd-daemon(3)'s SD_ERR ...) by structlog method / stdlib level name
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
              "critical": 2, "fatal": 2}
_threshold = logging.INFO


def _filter_level(_logger: Any, method: str, event: MutableMapping[str, Any]
                  ) -> MutableMapping[str, Any]:
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event


def _syslog_prefix(_logger: Any, method: str, line: str) -> str:
    """After the renderer: ``<N>`` in front of the rendered line, for journald."""
    return f"<{PRIORITIES.get(method, 6)}>{line}"


def journald_stream(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd connected us to."""
    stream = stream or sys.stderr
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def priority_prefix(priority: str) -> str:
    """``<N>`` for a line printed straight to stderr (the CLI's one-line errors and
    warnings) when stderr is the journal, else nothing."""
    return f"<{PRIORITIES[priority]}>" if journald_stream() else ""


def configure(level: str = "info", fmt: str = "auto") -> None:
    set_level(level)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    tail: list[structlog.typing.Processor] = [renderer]
    if journald_stream():
        tail.append(_syslog_prefix)  # type: ignore[arg-type]
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[_filter_level, structlog.contextvars.merge_contextvars, *shared, *tail],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(_threshold)
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    global _threshold
    _threshold = _LEVELS[level]
    logging.getLogger().setLevel(_threshold)


def get(name: str = "fibsync") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
