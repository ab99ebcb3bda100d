"""Corpus messages, mutated, through the whole gateway over SMTP; expansion cases; mime.parse's memory.

Every message gets a 250 with a sane upstream payload or a 5xx with a reason: never a crash, a hang, a 4xx
or 500, and parse memory stays under MEMORY_BOUND. In CI each corpus file gets one mutation (the kinds
take turns); HYPOTHESIS_PROFILE=long applies every kind to every file.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import smtplib
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from gateway import mime
from gateway.core.errors import ContentRejected
from gateway.mime import parser
from tests.conftest import CORPUS
from tests.fuzzing import sane_payload
from tests.harness import PASSWORD, USER, Running
from tests.smtputil import SENDER, connect
from tests.test_corpus import FALLBACK_RCPT, corpus_files, from_domains, reference

# Documented in docs/security.md: peak memory of mime.parse for one message, measured by tracemalloc.
MEMORY_FACTOR, MEMORY_CONSTANT = 32, 16 * 1024 * 1024
_CHARSET = re.compile(rb'(?i)(charset\s*=\s*)"?([\w.:-]+)"?')
_SWAPS = {b"utf-8": b"iso-8859-1", b"us-ascii": b"utf-8", b"iso-8859-1": b"koi8-r"}


def truncated(raw: bytes) -> bytes:
    return raw[: len(raw) * (len(raw) % 7 + 2) // 10]


def boundaries_removed(raw: bytes) -> bytes:
    return re.sub(rb"(?m)^--[^\r\n]*\r?\n", b"", raw)


def charsets_swapped(raw: bytes) -> bytes:
    def swap(m: re.Match[bytes]) -> bytes:
        return m.group(1) + _SWAPS.get(m.group(2).lower(), b"shift_jis")

    return _CHARSET.sub(swap, raw)


def headers_duplicated(raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n") if b"\r\n\r\n" in raw else raw.partition(b"\n\n")
    return head + (b"\r\n" if sep == b"\r\n\r\n" else b"\n") + head + sep + body


def nested(raw: bytes, levels: int = 30) -> bytes:
    """The message attached 30 levels deep, inside multiparts and attached messages."""
    for level in range(levels):
        if level % 2:
            raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
        else:
            raw = f"Content-Type: multipart/mixed; boundary=n{level}\r\n\r\n--n{level}\r\n".encode() + raw
            raw += f"\r\n--n{level}--\r\n".encode()
    return f"From: {SENDER}\r\n".encode() + raw


MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": truncated,
    "boundaries removed": boundaries_removed,
    "charsets swapped": charsets_swapped,
    "headers duplicated": headers_duplicated,
    "nested": nested,
}


def mutated_corpus() -> list[tuple[str, bytes]]:
    every = os.environ.get("HYPOTHESIS_PROFILE") == "long"
    out = []
    kinds = list(MUTATIONS)
    for index, name in enumerate(corpus_files()):
        raw = (CORPUS / name).read_bytes()
        for kind in kinds if every else [kinds[index % len(kinds)]]:
            out.append((f"{name} ({kind})", MUTATIONS[kind](raw)))
    return out


def expansion_cases(slow: bool = True) -> dict[str, bytes]:
    """Small messages built to make a decoder expand them; each must be refused or stay within bounds.
    `slow`: with the one that costs the most CPU (about 2 s of boundary matching; 20 s under tracemalloc)."""
    head = f"From: {SENDER}\r\nTo: {FALLBACK_RCPT}\r\nSubject: expansion\r\n".encode()
    inner = head + b"\r\n" + b"hello\r\n" * 10
    for _ in range(12):  # an attached message, base64-encoded, attached again, twelve times
        inner = (
            head
            + b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + (base64.encodebytes(inner))
        )
    parts = b"".join(
        b"--b\r\nContent-Type: image/gif\r\nContent-Transfer-Encoding: base64\r\n\r\nR0lG\r\n"
        for _ in range(parser.MAX_PARTS - 2)
    )
    levels = b"".join(b"Content-Type: multipart/mixed; boundary=d%d\r\n\r\n--d%d\r\n" % (i, i) for i in range(126))
    return {
        "nested base64 attached messages": inner,
        "markup bomb (& with an emoji)": head
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + "😀".encode()
        + b"&" * 2_000_000,
        "empty parts up to the limit": head
        + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\n\r\n" * (parser.MAX_PARTS - 2)
        + b"--b--\r\n",
        "one part past the limit": head
        + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\n\r\n" * parser.MAX_PARTS
        + b"--b--\r\n",
        "tiny images up to the limit": head + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--",
        "header lines bomb": head + b"X-A: b\r\n" * parser.MAX_HEADER_LINES + b"\r\nbody\r\n",
        "126 levels with many lines": head
        + levels
        + b"\r\n"
        + b"x\r\n" * (parser.MAX_NESTING_WORK // (2 * 128) - 500 if slow else 1_000),  # two line-end bytes a line
        "126 levels with too many lines": head + levels + b"\r\n" + b"x\r\n" * (parser.MAX_NESTING_WORK // 250),
        "encoded words bomb": head.replace(b"Subject: expansion", b"Subject: " + b"=?utf-8?b?8J+YgA==?=" * 60_000)
        + b"\r\nbody\r\n",
    }


@pytest.fixture
def corpus_gateway(gateway_factory: Callable[..., Running]) -> tuple[Running, Running]:
    """A gateway whose account may send from every From: domain of the corpus, and its upstream's gateway."""
    upstream = gateway_factory()
    refs = {name: reference((CORPUS / name).read_bytes()) for name in corpus_files()}
    account = {"api_base": upstream.sandbox_url, "sender_domains": from_domains(refs)}
    running = gateway_factory(accounts={"acme": account}, limits={"max_recipients": 100})
    return running, upstream


def deliver_all(
    running: Running, upstream: Running, messages: list[tuple[str, bytes]]
) -> tuple[Counter[str], list[str]]:
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    client = connect(running, timeout=60.0)
    client.login(USER, PASSWORD)
    try:
        for name, raw in messages:
            before = len(upstream.requests)
            code, text = client.mail(SENDER)
            assert code == 250, (name, code, text)
            assert client.rcpt(FALLBACK_RCPT)[0] == 250
            try:
                code, reply = client.data(raw)
            except smtplib.SMTPDataError as exc:
                code, reply = exc.smtp_code, exc.smtp_error
            line = reply.decode(errors="replace")
            accepted: list[dict[str, Any]] = [r["body"] for r in upstream.requests[before:] if r["status"] == 200]
            if code == 250:
                outcomes["250"] += 1
                problems = sane_payload(accepted[0]) if accepted else ["no upstream call"]
                if problems:
                    failures.append(f"{name}: {'; '.join(problems)}")
            elif 550 <= code <= 554 and re.match(r"^5\.\d+\.\d+ \S", line):
                outcomes[f"{code} {re.sub(r'[<(].*', '', line).strip()[:60]}"] += 1
                if accepted:
                    failures.append(f"{name}: refused with {code} but sent upstream")
            else:
                outcomes[f"unexpected {code}"] += 1
                failures.append(f"{name}: {code} {line}")
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()
    return outcomes, failures


@pytest.mark.corpus
def test_mutated_corpus_and_expansion_cases_through_the_gateway(
    corpus_gateway: tuple[Running, Running], terminal_summary: list[tuple[str, list[str]]]
) -> None:
    running, upstream = corpus_gateway
    messages = mutated_corpus()
    outcomes, failures = deliver_all(running, upstream, messages)
    lines = [f"{count:4d}  {outcome}" for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1])]
    terminal_summary.append(
        (f"corpus mutations: {len(messages)} messages through the gateway", [*lines, f"{len(failures)} problems"])
    )
    assert outcomes["250"] > len(messages) // 2, lines
    assert not failures, "\n".join(lines + failures)

    outcomes, failures = deliver_all(running, upstream, list(expansion_cases().items()))
    assert not failures, failures
    # Which of them are refused is part of the contract (docs/security.md).
    assert outcomes == Counter(
        {
            "250": 5,
            "552 5.3.4 Message size exceeds fixed limit once decoded": 1,
            "554 5.6.0 Message has too many MIME parts": 1,
            "554 5.6.0 Message has too many header lines": 1,
            "554 5.6.0 Message structure is nested too deeply": 1,
        }
    ), outcomes


@pytest.mark.corpus
def test_parse_memory_is_bounded() -> None:
    """Peak memory of mime.parse (tracemalloc) for every corpus message and every expansion case."""
    samples = [(name, (CORPUS / name).read_bytes()) for name in corpus_files()]
    samples += expansion_cases(slow=False).items()
    worst: list[tuple[float, str]] = []
    tracemalloc.start()
    try:
        for name, raw in samples:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            with contextlib.suppress(ContentRejected):
                mime.parse(bytearray(raw))
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak <= MEMORY_FACTOR * len(raw) + MEMORY_CONSTANT, (name, peak, len(raw))
            worst.append((peak / max(len(raw), 1), name))
    finally:
        tracemalloc.stop()
    assert len(worst) == len(samples)
