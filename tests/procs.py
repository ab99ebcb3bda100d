"""Gateway and sandbox subprocesses for end-to-end tests: start on any free port and read the ports bound
from the ready line, kill, read logs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.harness import APIKEY, PASSWORD, USER
from tests.spool_helpers import message, wait_for

CLI = [sys.executable, "-m", "gateway"]
# The line `smtp-gateway sandbox` prints once it listens.
SANDBOX_READY = re.compile(r"compatible upstream on http://[^ ]*:(\d+) ")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


# Every process a test starts through spawn(): conftest kills what is still running when the test ends,
# whether it passed, failed or left half-way (a process that ignored its stop signal included).
_SPAWNED: list[subprocess.Popen[Any]] = []


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen, with the guarantee that the process does not outlive the test."""
    proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
    _SPAWNED.append(proc)
    return proc


def reap() -> None:
    """Kill (SIGKILL) every spawned process still running and forget them all."""
    while _SPAWNED:
        kill(_SPAWNED.pop())


def kill(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def sandbox_command(*extra: str) -> list[str]:
    """`smtp-gateway sandbox` on any free port with the tests' DMDS account."""
    return [
        *CLI,
        "sandbox",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        "--apikey",
        APIKEY,
        "--campaign",
        "22=campaign-22-apikey",
        *extra,
    ]


def start_sandbox(record: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """The sandbox in a subprocess recording to `record` (with `extra` options), its output beside it; returns
    it and its URL, read from the line it prints once listening."""
    output = record.with_suffix(".sandbox.log")
    seen = len(SANDBOX_READY.findall(output.read_text())) if output.exists() else 0
    with output.open("ab") as out:
        proc = spawn(sandbox_command("--record", str(record), *extra), stdout=out, stderr=subprocess.STDOUT)

    def bound() -> int | None:
        found = SANDBOX_READY.findall(output.read_text(errors="replace"))
        if len(found) > seen:
            return int(found[seen])
        assert proc.poll() is None, output.read_text()
        return None

    try:
        return proc, f"http://127.0.0.1:{wait_for(bound, 15, 'sandbox listening')}"
    except BaseException:
        kill(proc)
        raise


def ready(log: Path, proc: subprocess.Popen[bytes], seen: int = 0, timeout: float = 20.0) -> dict[str, int]:
    """The ports a `serve` process logged in its `ready` event (each listener by name, and "http" for the
    operator endpoint), once it has logged one more than the `seen` already in `log`."""

    def bound() -> dict[str, int] | None:
        found = events(log, "ready")
        if len(found) > seen:
            return {**found[seen]["listeners"], **({"http": found[seen]["http"]} if "http" in found[seen] else {})}
        assert proc.poll() is None, log.read_text()
        return None

    return wait_for(bound, timeout, "gateway ready")


def serve(config: Path, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """`smtp-gateway serve` writing JSON logs to its own file (a killed process's half-written last line
    must never run into another process's first one); returns it and the ports it bound."""
    seen = len(events(log, "ready")) if log.exists() else 0
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        proc = spawn(
            [*CLI, "serve", "--config", str(config), "--drain-timeout", "2", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        return proc, ready(log, proc, seen)
    except BaseException:
        kill(proc)
        raise


def complete_lines(log: Path) -> list[str]:
    """The log's finished lines: the text after the last newline of a live process is still being written."""
    return log.read_text(errors="replace").split("\n")[:-1]


def events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log events called `name`; a last line cut short by a SIGKILL is not an event."""
    found = []
    for line in log.read_text().splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


def ambiguous(*logs: Path) -> set[str]:
    """Queue ids and upstream ids of the messages logged as `delivery_ambiguous`: the at-least-once window."""
    ids: set[str] = set()
    for log in logs:
        for event in events(log, "delivery_ambiguous"):
            ids.add(event["queue_id"])
            ids.update(event["upstream_ids"])
    return ids


RCPTS = ("a{n}@example.com", "c{n}@example.com", "b{n}@example.com")  # To a, c; Bcc b: two DMDS legs


def load(
    port: int,
    numbers: range,
    replies: dict[int, str],
    stop: threading.Event,
    per_session: int = 25,
    reconnect: bool = False,
) -> None:
    """Send messages `load N` over sessions of `per_session`; record each 250's id. Returns when the
    numbers are used up, `stop` is set, or the server goes away (unless `reconnect`: then it connects
    again, as a client behind a load balancer would; a message cut off by the failure is not retried)."""
    n_iter = iter(numbers)
    failures = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.login(USER, PASSWORD)
                for sent_in_session, n in enumerate(n_iter):
                    to = tuple(r.format(n=n) for r in RCPTS)
                    client.mail("billing@acme.example")
                    for r in to:
                        client.rcpt(r)
                    code, text = client.data(message(f"load {n}", to[:2]))
                    if code == 250:
                        replies[n] = text.decode().rsplit(" ", 1)[1]
                    if sent_in_session == per_session - 1 or stop.is_set():
                        break
                else:
                    return
        except (OSError, smtplib.SMTPException):
            failures += 1
            if not reconnect or failures > 20:
                return  # the server was killed under us


def recorded(record: Path) -> Counter[tuple[str, str]]:
    """Copies the sandbox accepted, by (subject, recipient)."""
    copies: Counter[tuple[str, str]] = Counter()
    for line in complete_lines(record):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry["kind"] != "send" or entry["status"] != 200:
                continue
            body = entry["body"]
            contacts = body.get("contactos") or [body["contacto"]]
            emails = [c["email"] for c in contacts] + [b["bcc_email"] for b in body.get("copia_oculta") or []]
            for email in emails:
                copies[(body["asunto"], email)] += 1
    return copies


def check_delivery(replies: dict[int, str], copies: Counter[tuple[str, str]], window: set[str]) -> None:
    """Every accepted message reached every recipient; a second copy only within the ambiguous window."""
    missing, duplicated = [], []
    for n, reply_id in replies.items():
        for rcpt in RCPTS:
            email = rcpt.format(n=n)
            count = copies[(f"load {n}", email)]
            if count == 0:
                missing.append((n, email))
            elif count > 1 and reply_id not in window:
                duplicated.append((n, email, count))
    assert missing == []
    assert duplicated == []


def queue(config: Path, *args: str) -> str:
    out = subprocess.run([*CLI, "queue", "--config", str(config), *args], capture_output=True, check=False)
    return out.stdout.decode()


def queue_empty(config: Path) -> bool:
    listing = json.loads(queue(config, "list", "--json") or '{"messages": [1]}')
    return listing["messages"] == []
