"""The First-day page's "After the 250", run as it is shown against a real quick start (on any free ports): swaks
to a bouncing address, `status` turning bounced, the notice and the webhooks the sandbox received, the
suppression list and the next RCPT refused. Each command's output is compared with the page's, what differs
between runs (ids, times, ports, the instance's name) aside."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
from pathlib import Path

from tests.docs_blocks import Block, doc_blocks
from tests.spool_helpers import wait_for
from tests.test_docs import BIN, DOC_PORTS, _env, assert_shown, run_shown
from tests.test_first_contact import Lines

NORMAL = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\b[0-9A-F]{16}\b"), "<id>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"), "<time>"),
    (re.compile(r"\(\d{4}-\d\d-\d\d\)"), "(<date>)"),
    (re.compile(r"by \S+:\d+:[0-9a-f]{8}-[0-9a-f]{8}"), "by <instance>"),
    (re.compile(r"127\.0\.0\.1:\d+ on listener"), "127.0.0.1:<port> on listener"),
    (re.compile(r", \d+ B$"), ", <size> B"),
    (re.compile(r"\s+$"), ""),
]


def normal(line: str) -> str:
    for pattern, into in NORMAL:
        line = pattern.sub(into, line)
    return line


def test_the_quick_start_tells_the_whole_story(tmp_path: Path) -> None:
    blocks = doc_blocks("test_the_quick_start_tells_the_whole_story")
    [send, *shown] = blocks
    proc = subprocess.Popen(
        [str(BIN / "smtp-gateway"), "quickstart", "--port", "0", "--tls-port", "0", "--sandbox-port", "0",
         "--http-port", "0"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    try:
        ready = err.event("ready")
        sandbox = int(re.findall(r"sandbox upstream .*http://127\.0\.0\.1:(\d+)", err.text())[0])
        real = {
            "smtp": ready["listeners"]["plain"],
            "sandbox": sandbox,
            "tls": ready["listeners"]["submission"],
            "http": ready.get("http", 0),
        }

        def to_real(text: str) -> str:
            for name, port in DOC_PORTS.items():
                text = re.sub(rf"127\.0\.0\.1:{port}\b", f"127.0.0.1:{real[name]}", text)
            return text

        def check(block: Block) -> None:
            """Run the block's commands (on the real ports) and compare their output with the page's."""
            real_block = dataclasses.replace(block, text=to_real(block.text))
            for cmd, lines_shown, lines_real in run_shown(real_block, tmp_path, _env()):
                assert_shown(lines_shown, lines_real, normal, f"{block.where()}: $ {cmd}")

        check(send)

        def told() -> bool:
            spool = "var/quickstart/spool.sqlite3"
            status = subprocess.run(
                [str(BIN / "smtp-gateway"), "status", "--spool", spool, "invoice-7@example.com"],
                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            text = status.stdout
            return " bounced " in text and "dsn_sent" in text and text.count("webhook_delivered") == 2

        wait_for(told, 30, "the bounce read back, the notice sent and both webhooks delivered")
        for block in shown:
            check(block)
    finally:
        proc.send_signal(signal.SIGINT)
        status_code = proc.wait(30)
        err.close()
        out.close()
    assert status_code == 130, err.text()  # Ctrl-C, as shells report it
    assert "Traceback" not in err.text() + out.text()
