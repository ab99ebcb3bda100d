"""[log] format: "auto" writes console lines on a terminal and JSON lines elsewhere; "json"/"console" force."""

from __future__ import annotations

import io
import sys

import pytest

from gateway.config import LogSettings
from gateway.ops import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LogSettings().format == "auto"
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not logs.json_lines(LogSettings())
    assert logs.json_lines(LogSettings(format="json"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert logs.json_lines(LogSettings())
    assert not logs.json_lines(LogSettings(format="console"))


def test_library_records_render_in_the_same_format() -> None:
    import json
    import logging

    record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "error connecting: %s", ("refused",), None)
    saved = logs._STATE.json
    try:
        logs._STATE.json = True
        line = json.loads(logs._LibraryFormatter().format(record))
    finally:
        logs._STATE.json = saved
    assert (line["event"], line["logger"], line["message"], line["level"]) == (
        "library_log",
        "psycopg.pool",
        "error connecting: refused",
        "warning",
    )
    assert line["timestamp"].endswith("Z")


# Run in a process of its own: logging is configured once per process, on the real sys.stderr.
ONE_WRITE_PER_LINE = """
import io, json, logging, sys
import structlog

class Recording(io.TextIOBase):
    calls = []
    def write(self, text):
        Recording.calls.append(text)
        return len(text)
    def isatty(self):
        return False

sys.stderr = Recording()
from gateway.ops import logs
from gateway.config import LogSettings
logs.configure(LogSettings(format=sys.argv[1]))
structlog.get_logger().info("gateway_event", detail="x" * 300)
logging.getLogger("somelibrary").warning("library warning")
print(json.dumps(Recording.calls), file=sys.__stdout__)
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_log_line_is_one_write(fmt: str) -> None:
    """`serve --workers N` shares one stderr: a line written in two pieces (text, then its newline, as
    print() does when stderr is unbuffered, e.g. PYTHONUNBUFFERED=1) interleaves with another worker's."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", ONE_WRITE_PER_LINE, fmt],
        capture_output=True,
        check=True,
        env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
        timeout=60,
    ).stdout
    calls = json.loads(out)
    assert len(calls) == 2, calls
    for call in calls:
        assert call.endswith("\n") and call.count("\n") == 1, calls


LEVELS_NOW = """
import json, sys
from gateway.ops import logs
from gateway.config import LogSettings
seen = [logs.enabled("debug")]  # not configured yet: whoever set up structlog's processors decides
logs.configure(LogSettings(level="info"))
seen += [logs.enabled("debug"), logs.enabled("info"), logs.enabled("error")]
logs.reconfigure(LogSettings(level="debug"))
seen += [logs.enabled("debug")]
logs.reconfigure(LogSettings(level="error"))
seen += [logs.enabled("warning"), logs.enabled("error")]
print(json.dumps(seen))
"""


def test_enabled_follows_the_live_level() -> None:
    """logs.enabled() lets a caller skip building a line's fields; it follows the level a reload sets."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", LEVELS_NOW], capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"}, timeout=60
    ).stdout
    assert json.loads(out) == [True, False, True, True, True, False, True]


@pytest.mark.parametrize(
    "ns",
    [1_796_580_700_000_000_000, 1_796_580_700_000_001_999, 1_796_580_700_164_512_345, 1_796_580_701_999_999_999, 0],
)
def test_timestamps_read_as_isoformat_writes_them(ns: int) -> None:
    """The lines' timestamp (formatted once a second) is datetime's isoformat in UTC with a Z: the
    microseconds of the instant, none at a whole second."""
    import datetime

    stamp = logs._Timestamp()
    stamp.now(ns - 1_000_000_000)  # the second before is remembered, not reused
    expected = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=ns // 1000)
    assert stamp.now(ns) == expected.isoformat().replace("+00:00", "Z")
    assert stamp.now(ns) == stamp.now(ns)
