"""Structured logging: stable snake_case events with fields, JSON or console, one configuration point.

Level and format can change while the server runs (SIGHUP): structlog caches each logger's configuration
on first use, so both are read per event from `_STATE` rather than baked into the configuration.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from gateway.config import LogSettings
from gateway.core.episode import Episode
from gateway.ops.metrics import LOG_LINES_DROPPED

# structlog method names -> levels ("exception" logs at error level with the traceback).
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _fallback(value: Any) -> Any:
    """What orjson cannot encode, as structlog's own JSON renderer does it: __structlog__(), else repr()."""
    method = getattr(value, "__structlog__", None)
    return method() if method is not None else repr(value)


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()


class _State:
    """The live level and renderer."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.json = False
        # orjson: a tenth of the stdlib encoder's time per line (a few lines per message).
        self._json = structlog.processors.JSONRenderer(serializer=_dumps)
        self._console = structlog.dev.ConsoleRenderer(colors=False)

    def filter(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if _LEVELS.get(method, logging.INFO) < self.level:
            raise structlog.DropEvent
        return event

    def render(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if self.json:
            return str(self._json(logger, method, event))
        return self._console(logger, method, event)


_STATE = _State()


class _Timestamp:
    """structlog's TimeStamper(fmt="iso", utc=True), the same text ("2026-12-06T18:11:40.164512Z", no
    fraction at a whole second, as isoformat() writes it), its date and time of day formatted once a second
    rather than for every line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event

    def now(self, ns: int | None = None) -> str:
        second, rest = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
        if second != self._second:
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        micro = rest // 1000
        return f"{self._prefix}.{micro:06d}Z" if micro else self._prefix + "Z"


_configured = False
_TIMESTAMP = _Timestamp()


class _Sink:
    """Where every line goes (ours and the libraries'): a line that cannot be written (ENOSPC under a log
    file, EPIPE once `serve | tee`'s reader died, EIO) is dropped and counted, never raised. A log call sits
    between a message's 250 and its reply, between a claim and its outcome: its failing must change no reply
    and no delivery. Each line is tried (one failed write is the whole cost), so the log comes back by itself
    once writes succeed again, with one line saying how many were lost.

    The stream's descriptor is written with os.write, one call per line: a file object's buffer would keep
    a failed line and write it, or half of it, later; a stream without a descriptor (a test's) is written
    and flushed."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._encoding = getattr(file, "encoding", None) or "utf-8"
        self._fd: int | None
        try:
            file.flush()  # what was written through the file object before goes first
            self._fd = file.fileno()
        except (OSError, AttributeError, io.UnsupportedOperation):
            self._fd = None
        # Threads (executors) log too: one line at a time, whole. Re-entrant: a collection that starts at an
        # allocation inside a write can run a finalizer that logs on the same thread ("Future exception was
        # never retrieved", "Unclosed client session"); its line waits in `_pending` for the one being
        # written, rather than the thread waiting for itself for ever.
        self._lock = threading.RLock()
        self._pending: list[str] | None = None  # not None while a line is being written (by the lock's holder)
        self._dropping = Episode()
        self._torn = False  # a write failed half-way: the next line starts on a line of its own

    def write(self, line: str) -> None:
        with self._lock:
            if self._pending is not None:  # the holder itself, re-entered: after the current line
                self._pending.append(line)
                return
            self._pending = []
            try:
                self._write(line)
                while self._pending:
                    self._write(self._pending.pop(0))
            finally:
                self._pending = None

    def _write(self, line: str) -> None:
        try:
            self._put(line)
        except OSError:
            LOG_LINES_DROPPED.inc()
            self._dropping.occurred()
            return
        over = self._dropping.ended()
        if over is None:
            return
        notice = {
            "event": "log_lines_dropped",
            "level": "warning",
            "dropped": over.seen,
            "lasted": over.lasted,
            "timestamp": _TIMESTAMP.now(),
        }
        try:
            self._put(_STATE.render(None, "warning", notice))
        except OSError:
            LOG_LINES_DROPPED.inc()
            self._dropping.occurred()

    def _put(self, line: str) -> None:
        text = ("\n" if self._torn else "") + line + "\n"
        if self._fd is None:
            self._file.write(text)
            self._file.flush()
            return
        data = memoryview(text.encode(self._encoding, "backslashreplace"))
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            self._torn = written > 0 or self._torn
            raise
        self._torn = False


class _SinkLogger:
    """structlog's WriteLogger with the sink: every method writes the rendered line."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SinkLoggerFactory:
    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def __call__(self, *args: Any) -> _SinkLogger:
        return _SinkLogger(self._sink)


class _LibraryHandler(logging.Handler):
    """Libraries' records through the same sink: a failing log drops their lines as it drops ours (the
    standard StreamHandler would print a traceback per record to the same failing stream)."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record's own arguments that do not format: logging's usual report
            self.handleError(record)
            return
        self._sink.write(line)


class _LibraryFormatter(logging.Formatter):
    """Libraries' own log records (psycopg's pool, asyncio) as lines of the same format as ours, so a
    JSON log stays JSON on every line: event "library_log" with the logger's name and its message."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "event": "library_log",
            "logger": record.name,
            "message": record.getMessage(),
            "level": record.levelname.lower(),
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return _STATE.render(None, record.levelname.lower(), event)


def enabled(method: str) -> bool:
    """Whether a line logged with `method` ("debug", "info", ...) is written now: a caller may skip
    computing the fields of one that is not. Before configure() structlog's processors are whoever set them
    up (a test capturing every event): then every level may be."""
    return not _configured or _LEVELS[method] >= _STATE.level


def json_lines(settings: LogSettings) -> bool:
    """JSON unless forced to console, or "auto" on a terminal (a person reading)."""
    if settings.format == "auto":
        return not sys.stderr.isatty()
    return settings.format == "json"


def configure(settings: LogSettings) -> None:
    """Set the level and format; the first call also configures structlog and the standard library."""
    global _configured
    _STATE.level = _LEVELS[settings.level]
    _STATE.json = json_lines(settings)
    if _configured:
        return
    _configured = True
    sink = _Sink(sys.stderr)
    structlog.configure(
        processors=[
            _STATE.filter,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _TIMESTAMP,
            structlog.processors.format_exc_info,
            _STATE.render,
        ],
        # Nothing below debug is ever logged; the level itself is _STATE's, read per event.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        # One write per line (print() writes the newline apart): workers share stderr.
        logger_factory=_SinkLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )
    # Libraries: warnings only (aiosmtpd logs every command at INFO; httpx every request).
    handler = _LibraryHandler(sink)
    handler.setFormatter(_LibraryFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    for name in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # psycopg's pool warns at every failed reconnection while the database is down: the queue logs the outage
    # itself, once when it begins and once when it ends (queue_database_unreachable, queue_database_back).
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    # aiosmtpd warns about its own deprecated Session.login_data on every AUTH, and logs client lines
    # (AUTH responses included) at INFO and unknown commands at WARNING: never let those through.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # aiohttp.server stays at warning (a handler's bug is reported there, with its traceback), but its
    # "Error handling request" for a malformed request, whose traceback quotes the request's header line (a
    # token, a cookie), never reaches a handler: gateway.ops.http's BadRequestFilter, installed on that logger
    # by every operator endpoint it starts, turns it into a sampled http_bad_request line.


def reconfigure(settings: LogSettings) -> None:
    """A reload's new level and format, where logging was configured (a server; not in-process tests)."""
    if _configured:
        configure(settings)
