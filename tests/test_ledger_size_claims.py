"""docs/after-250.md "Its size": what the message ledger adds to the queue's SQLite file a message, measured as
the pages 1,000 of bench/genmsg.py's ~5 KB message (multipart/alternative, one recipient, delivered inline)
add after a checkpoint, with `keep_bodies` false (the default) and true. `pytest -s` prints the figures the
page gives; the bounds are generous, against a record that grows by a copy of the message."""

from __future__ import annotations

import importlib.util
import smtplib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tests.harness import PASSWORD, USER, Running
from tests.test_ledger_e2e import FAST, flushed

# bench/ is no package: its message generator is loaded from its file (it imports only the stdlib).
_SPEC = importlib.util.spec_from_file_location("genmsg", Path(__file__).resolve().parent.parent / "bench" / "genmsg.py")
assert _SPEC is not None and _SPEC.loader is not None
genmsg = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(genmsg)

N = 1000


def _file_size(path: Path) -> int:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        size: int = db.execute("PRAGMA page_size").fetchone()[0]
        return pages * size
    finally:
        db.close()


def _per_message(gateway_factory: Callable[..., Running], keep_bodies: bool) -> tuple[int, float]:
    raw = genmsg.small_message().replace(genmsg.SENDER.encode(), b"billing@acme.example")
    gw = gateway_factory(delivery=FAST, ledger={"keep_bodies": keep_bodies})
    path = Path(gw.settings.delivery.spool_path)
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(USER, PASSWORD)
        client.sendmail("billing@acme.example", ["client@example.com"], raw)
        flushed(gw)  # the schema and the first pages are there
        before = _file_size(path)
        for _ in range(N):
            client.sendmail("billing@acme.example", ["client@example.com"], raw)
    flushed(gw)
    return len(raw), (_file_size(path) - before) / N


def test_a_ledger_record_takes_about_2_kib_and_5_with_the_text(gateway_factory: Callable[..., Running]) -> None:
    size, default = _per_message(gateway_factory, keep_bodies=False)
    _, bodies = _per_message(gateway_factory, keep_bodies=True)
    print(f"\n{size}-byte message: {default / 1024:.2f} KiB a message, {bodies / 1024:.2f} KiB with keep_bodies")
    assert default < 3 * 1024
    assert bodies - default > 2 * 1024  # the kept request holds the HTML and the text
    assert bodies < size * 1.5
