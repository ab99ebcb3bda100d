"""[log] format: "auto" writes console lines on a terminal and JSON lines elsewhere; "json"/"console" force."""

from __future__ import annotations

import io
import sys

import pytest

from gateway import logs
from gateway.settings import LogSettings


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

    record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "error connecting: %s", ("refused",),
                               None)
    saved = logs._STATE.json
    try:
        logs._STATE.json = True
        line = json.loads(logs._LibraryFormatter().format(record))
    finally:
        logs._STATE.json = saved
    assert (line["event"], line["logger"], line["message"], line["level"]) == (
        "library_log", "psycopg.pool", "error connecting: refused", "warning")
    assert line["timestamp"].endswith("Z")
