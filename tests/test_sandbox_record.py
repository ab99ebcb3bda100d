"""The sandbox's request record in a long quick start (first-contact review, finding 7): the gateway's own
event polls, one or two a second, flooded the terminal (306 of 344 lines after five minutes) and grew the
record file and GET /_sandbox/requests without bound. Now a poll is printed only when its answer changes,
every other request always; memory keeps the newest KEPT_REQUESTS and the file is moved aside at
RECORD_MAX_BYTES."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.providers import sandbox as sandbox_module
from gateway.providers.dmds.eventwire import EVENT_WIRE
from gateway.providers.sandbox import Sandbox, SandboxState
from tests.harness import APIKEY, LoopThread, sandbox_for_tests


@pytest.fixture
def echoed(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[str, io.StringIO, Sandbox]]:
    out = io.StringIO()
    sandbox = sandbox_for_tests(SandboxState(echo=out, record_path=tmp_path / "requests.jsonl"))
    port = loop_thread.run(sandbox.start())
    try:
        yield f"http://127.0.0.1:{port}", out, sandbox
    finally:
        loop_thread.run(sandbox.stop())


def _poll(url: str, second: int) -> None:
    """A DMDS event poll as the return path makes it: a new time window each time, nothing in it."""
    window = {"desde": f"2026-12-07 10:00:{second:02d}", "hasta": f"2026-12-07 10:05:{second:02d}", "pagina": 1}
    httpx.request(
        EVENT_WIRE["events_method"],
        url + EVENT_WIRE["events"],
        json={**window, "cantidad": 100},
        headers={"Authorization": APIKEY},
        timeout=10,
    )


def _kinds(out: io.StringIO) -> list[tuple[str, int | None]]:
    return [(e["kind"], e["status"]) for e in map(json.loads, out.getvalue().splitlines())]


def test_polls_are_printed_when_their_answer_changes(echoed: tuple[str, io.StringIO, Sandbox]) -> None:
    url, out, sandbox = echoed
    for second in range(3):
        _poll(url, second)
    httpx.get(f"{url}/v1/version/", headers={"Authorization": APIKEY}, timeout=10)
    httpx.get(
        f"{url}/v1/version/", headers={"Authorization": APIKEY}, timeout=10
    )  # not a poll: printed however often it comes
    httpx.post(f"{url}/_sandbox/faults", json={"status": 503, "count": 2, "kind": "events"}, timeout=10)
    for second in range(3, 8):
        _poll(url, second)
    assert _kinds(out) == [
        ("events", 200),  # the first
        ("version", 200),
        ("version", 200),
        ("events", 503),  # the outage begins (the second 503 repeats it)
        ("events", 200),  # and ends
    ]
    # Everything is still recorded, in memory and in the file.
    assert len(httpx.get(f"{url}/_sandbox/requests", timeout=10).json()) == 10
    assert sandbox.state.record_path is not None
    assert len(sandbox.state.record_path.read_text().splitlines()) == 10


def test_the_record_is_bounded_in_memory_and_on_disk(
    loop_thread: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox_module, "KEPT_REQUESTS", 5)
    monkeypatch.setattr(sandbox_module, "RECORD_MAX_BYTES", 2000)
    record = tmp_path / "requests.jsonl"
    sandbox = sandbox_for_tests(SandboxState(record_path=record))
    url = f"http://127.0.0.1:{loop_thread.run(sandbox.start())}"
    try:
        for second in range(40):
            _poll(url, second)
        kept = httpx.get(f"{url}/_sandbox/requests", timeout=10).json()
        health = httpx.get(f"{url}/_sandbox/health", timeout=10).json()
    finally:
        loop_thread.run(sandbox.stop())
    assert len(kept) == 5 and kept[-1]["body"]["desde"] == "2026-12-07 10:00:39"  # the newest
    assert health["requests"] == 40  # counted beyond what is kept
    line = max(len(s) + 1 for f in (record, tmp_path / "requests.jsonl.1") for s in f.read_text().splitlines())
    for f in (record, tmp_path / "requests.jsonl.1"):
        assert f.stat().st_size < 2000 + line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "requests.jsonl.1"]
    assert json.loads(record.read_text().splitlines()[-1])["body"]["desde"] == "2026-12-07 10:00:39"
