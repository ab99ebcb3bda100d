"""Webhook receivers' odd answers, against the real sender, the real HTTP client (both transports) and a real
receiver on 127.0.0.1, over a real SQLite outbox: what is logged, kept in the outbox and put on the timeline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config.returnpath import WebhookSettings
from gateway.config.urls import MASK, without_url_parts
from gateway.ledger import render
from gateway.ledger.backends import open_returns
from gateway.ledger.model import OutboxRow
from gateway.ops.metrics import WEBHOOK_DUPLICATES, WEBHOOK_FAILED, WEBHOOK_PENDING
from gateway.returnpath.webhooks import ANSWER_KEPT, WebhookSender
from gateway.upstream.client import HttpClient, TransportKind
from tests.test_returnpath_units import T0, Clock, _ledger, _select, _sent

TOKEN = "T0KEN-8f3a9c2e71d44b0f"


@asynccontextmanager
async def _receiver(answer: bytes, got: list[bytes] | None = None) -> AsyncIterator[int]:
    """A receiver that reads one request (head and body: kept in `got`) and writes `answer` as it is; yields its
    port. The client may close before the answer is all written (it reads no more than it needs)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        if got is not None:
            got.append(body)
        try:
            writer.write(answer)
            await writer.drain()
        except ConnectionError:
            pass  # the client had what it needed
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _one_round(
    tmp_path: Path, answer: bytes, name: str, transport: TransportKind
) -> tuple[int, str, int, str | None]:
    """One delivery to a receiver answering `answer`: (POSTs received, the row's state, attempts, last_error)."""
    got: list[bytes] = []
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0, transport=transport)
    try:
        async with _receiver(answer, got) as port:
            await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
            await ledger.write([OutboxRow(name, "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
            hook = WebhookSettings(name=name, url=f"http://127.0.0.1:{port}/h", secret="s", timeout=5, backoff=1)
            sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {name: hook}, clock=Clock(T0))
            await sender.round()
        [(state, attempts, error)] = _select(tmp_path, "SELECT state, attempts, last_error FROM webhook_outbox")
        return len(got), str(state), int(attempts), error  # type: ignore[call-overload]
    finally:
        await http.aclose()
        await ledger.close()


def _count(webhook: str) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for m in WEBHOOK_FAILED.collect()
        for s in m.samples
        if s.labels.get("webhook") == webhook and s.name.endswith("_total")
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_hooks_secret_path_is_in_no_log_line_outbox_row_or_timeline(
    tmp_path: Path, transport: TransportKind
) -> None:
    """A receiver (or a proxy, a wrong port) answering a malformed status line: aiohttp's error text ends
    `url='<the whole URL>'`, and a hook's path is often its token. It must reach neither the logs, nor the
    outbox's last_error, nor the `webhook_failed` timeline detail the API and the console show; and the attempt
    is counted as an answer that is not HTTP, not as a timeout."""
    name = f"garbled-{transport}"
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0, transport=transport)
    async with _receiver(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok") as port:
        try:
            await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
            await ledger.write([OutboxRow(name, "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
            hook = WebhookSettings(
                name=name, url=f"http://127.0.0.1:{port}/hooks/{TOKEN}", secret="s", timeout=5, backoff=1, max_age=60
            )
            clock = Clock(T0)
            before = _count(name)
            sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {name: hook}, clock=clock)
            with capture_logs() as logs:
                await sender.round()  # retried: logged at warning, kept as last_error
                [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
                assert state == "pending" and error
                clock.t = T0 + 3600.0  # past max_age: failed for good, on the timeline
                await sender.round()
            [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
            [(detail,)] = _select(tmp_path, "SELECT detail FROM ledger_events WHERE kind='webhook_failed'")
            assert state == "failed"
            record = await ledger.get("M1")  # as the API (to_json) and `status` (render) show it
            assert record is not None and any(e.kind == "webhook_failed" for e in record.events)
            shown = (json.dumps(record.to_json()), *render.record(record))
            for text in (str(error), str(detail), *shown, *(repr(line) for line in logs)):
                assert TOKEN not in text and "/hooks/" not in text, text
            assert "not HTTP" in str(error)
            assert len(logs) == 2
            after = _count(name)
            assert after.get("invalid_answer", 0) - before.get("invalid_answer", 0) == 2
            assert after.get("timeout", 0) == before.get("timeout", 0)
        finally:
            await http.aclose()
            await ledger.close()


def _page(status: bytes, page: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (status, len(page), page)


# Express's default 404 (and a hook whose token was revoked or whose route was removed answers 404) repeats the
# request's path; the kept text is cut at ANSWER_KEPT, mid-token too; a framework may repeat it lowercased.
_ECHOES = {
    "express-404": _page(b"404 Not Found", f"<pre>Cannot POST /hooks/{TOKEN}</pre>".encode()),
    "cut-mid-token": _page(b"404 Not Found", b"x" * (ANSWER_KEPT - 24) + f" POST /hooks/{TOKEN}".encode()),
    "lowercased": _page(b"410 Gone", f"route /hooks/{TOKEN.lower()} gone".encode()),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("echo", list(_ECHOES))
async def test_an_error_page_that_repeats_the_hooks_path_is_kept_without_it(
    tmp_path: Path, transport: TransportKind, echo: str
) -> None:
    """The answer's text was kept as it came (`HTTP 404: <body>`): the hook's token went into the outbox's
    last_error, the logs, the timeline and the API. Now its status and its text without the URL's path."""
    name = f"{echo}-{transport}"
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0, transport=transport)
    async with _receiver(_ECHOES[echo]) as port:
        try:
            await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
            await ledger.write([OutboxRow(name, "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
            hook = WebhookSettings(
                name=name, url=f"http://127.0.0.1:{port}/hooks/{TOKEN}", secret="s", timeout=5, backoff=1, max_age=60
            )
            clock = Clock(T0)
            sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {name: hook}, clock=clock)
            with capture_logs() as logs:
                await sender.round()  # retried: logged at warning, kept as last_error
                [(kept,)] = _select(tmp_path, "SELECT last_error FROM webhook_outbox")
                clock.t = T0 + 3600.0  # past max_age: failed for good, on the timeline
                await sender.round()
            [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
            [(detail,)] = _select(tmp_path, "SELECT detail FROM ledger_events WHERE kind='webhook_failed'")
            record = await ledger.get("M1")
            assert record is not None and state == "failed"
            shown = (json.dumps(record.to_json()), *render.record(record))
            for text in (str(kept), str(error), str(detail), *shown, *(repr(line) for line in logs)):
                # Not the token, nor its first characters (the kept text is cut mid-token).
                assert TOKEN[:8].lower() not in text.lower(), text
            assert str(error).startswith(("HTTP 404: ", "HTTP 410: ")) and MASK in str(error), error
        finally:
            await http.aclose()
            await ledger.close()


def test_a_hooks_path_query_and_long_segments_are_masked_wherever_they_are_repeated() -> None:
    url = f"https://hooks.example.net/services/{TOKEN}?sig=Q5ecret77"
    assert (
        without_url_parts(f"HTTP 404: Cannot POST /services/{TOKEN}?sig=Q5ecret77", url)
        == f"HTTP 404: Cannot POST {MASK}"
    )
    assert (
        without_url_parts(f"HTTP 403: {TOKEN} revoked (sig Q5ecret77)", url) == f"HTTP 403: {MASK} revoked (sig {MASK})"
    )
    assert without_url_parts("HTTP 404: not%2Dhere", "https://h.example/a%2Dlongish") == "HTTP 404: not%2Dhere"
    assert without_url_parts("HTTP 404: see /a-longish", "https://h.example/a%2Dlongish") == f"HTTP 404: see {MASK}"
    assert without_url_parts(f"HTTP 500: at {url} now", url) == f"HTTP 500: at {MASK} now"
    # Short segments and a URL with no path say nothing: the answer stays readable.
    assert without_url_parts("HTTP 404: Cannot POST /v1/x", "https://h.example/v1/x") == "HTTP 404: Cannot POST /v1/x"
    assert without_url_parts("HTTP 502: Bad Gateway", "https://h.example:8443") == "HTTP 502: Bad Gateway"


def test_plain_words_of_a_hooks_path_stay_readable_in_its_answers() -> None:
    """Review today8b F3: every 6+ character piece of the path was masked anywhere in the answer, whatever its
    case: a hook at /hooks/internal made 'Internal Server Error' a mask. A piece that is a plain word is masked
    only as written in the URL (review today9 F3: it may be a token of letters); the path, the query and
    secret-looking pieces whatever their case."""
    kept = without_url_parts("HTTP 400: invalid Events payload", "https://hooks.example.com/smtp/events?t=Zx81kQp2")
    assert kept == "HTTP 400: invalid Events payload"
    hook = "https://example.com/hooks/internal"
    assert without_url_parts("HTTP 500: Internal Server Error", hook) == "HTTP 500: Internal Server Error"
    assert without_url_parts("HTTP 404: Cannot POST /hooks/internal", hook) == f"HTTP 404: Cannot POST {MASK}"
    assert without_url_parts("HTTP 404: Cannot POST /HOOKS/INTERNAL", hook) == f"HTTP 404: Cannot POST {MASK}"
    signed = "https://h.example/smtp-events/abcDEFghiJKL?sig=Zx81kQp2&user=webhook_receiver"
    said = "HTTP 403: SMTP-Events refused ABCdefGHIjkl (sig zx81kqp2) for Webhook_Receiver, webhook_receiver"
    assert without_url_parts(said, signed) == (
        f"HTTP 403: SMTP-Events refused {MASK} (sig {MASK}) for Webhook_Receiver, {MASK}"
    )
    long_word = "https://h.example/hooks/abcdefghijklmnopqrstuvwxyz"  # letters only, but a token's length
    assert without_url_parts("HTTP 404: no ABCDEFGHIJKLMNOPQRSTUVWXYZ", long_word) == f"HTTP 404: no {MASK}"
    # A piece cut at the end of the kept text: its beginning is masked, a secret's whatever its case, any
    # other's as written.
    assert without_url_parts("HTTP 403: token zX81Kq", "https://h.example/hooks/internal/Zx81kQp2") == (
        f"HTTP 403: token {MASK}"
    )
    assert without_url_parts("HTTP 500: Internal", hook) == "HTTP 500: Internal"
    assert without_url_parts("HTTP 500: from intern", hook) == f"HTTP 500: from {MASK}"


@pytest.mark.parametrize(
    ("token", "url"),
    [
        ("QWERTYUIOPASDFGH", "https://h.example/hooks/in?token={t}"),  # a base32 token without a digit
        ("kzqvwxmplrtbnhsd", "https://h.example/hooks/{t}"),  # lower-case letters
        ("Kzqvwxmplrtb", "https://h.example/hooks/{t}/events"),
    ],
)
def test_a_letters_only_token_echoed_alone_is_masked(token: str, url: str) -> None:
    """Review today9 F3: a token of letters only, under LONG_PIECE, is a "plain word", and was kept when the
    receiver echoed it alone (in the outbox row, webhook_delivery_failed, the timeline, the API)."""
    hook = url.format(t=token)
    assert without_url_parts(f"HTTP 401: unknown token {token}", hook) == f"HTTP 401: unknown token {MASK}"
    assert without_url_parts(f"HTTP 401: unknown token {token[:8]}", hook) == f"HTTP 401: unknown token {MASK}"


BIG = 2 << 20  # over the client's MAX_RESPONSE (1 MiB)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_2xx_with_a_body_over_the_size_read_is_a_delivery(tmp_path: Path, transport: TransportKind) -> None:
    """A receiver that took the event and answered 200 with a big page (a framework's debug page, an echo): the
    status says it was taken. Not an answer lost, not POSTed again for max_age."""
    name = f"big-{transport}"
    lost = WEBHOOK_DUPLICATES.labels(webhook=name, cause="answer_lost")._value.get()
    before = _count(name)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG
    posts, state, attempts, error = await _one_round(tmp_path, answer, name, transport)
    assert (posts, state, attempts, error) == (1, "delivered", 1, None)
    assert WEBHOOK_DUPLICATES.labels(webhook=name, cause="answer_lost")._value.get() == lost
    assert _count(name) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_5xx_with_a_body_over_the_size_read_is_an_http_5xx_with_its_first_words(
    tmp_path: Path, transport: TransportKind
) -> None:
    name = f"big5-{transport}"
    before = _count(name)
    answer = b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n" % BIG + b"busy " * (BIG // 5)
    posts, state, attempts, error = await _one_round(tmp_path, answer, name, transport)
    assert (posts, state, attempts) == (1, "pending", 1)
    assert error is not None and error.startswith("HTTP 503: busy busy") and len(error) < 300
    after = _count(name)
    assert after.get("http_5xx", 0) == before.get("http_5xx", 0) + 1
    assert after.get("timeout", 0) == before.get("timeout", 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_redirect_is_not_followed_counted_http_3xx_and_says_where_without_its_query(
    tmp_path: Path, transport: TransportKind
) -> None:
    """A moved endpoint (http to https, a new path) or a hostile one (the cloud's metadata address): never
    followed, counted under a documented reason, and the operator is told where it points: its scheme and host,
    not its path (an http -> https redirect repeats the hook's path, often its token) nor its query."""
    name = f"moved-{transport}"
    before = _count(name)
    answer = (
        b"HTTP/1.1 308 Permanent Redirect\r\n"
        b"Location: https://169.254.169.254/hooks/T0KEN-8f3a/?token=T0KEN#frag\r\nContent-Length: 0\r\n\r\n"
    )
    posts, state, attempts, error = await _one_round(tmp_path, answer, name, transport)
    assert (posts, state, attempts) == (1, "pending", 1)
    assert error == f"HTTP 308 to https://169.254.169.254/{MASK} (not followed)"
    after = _count(name)
    assert {r for r in after if after[r] != before.get(r, 0)} == {"http_3xx"}


@pytest.mark.asyncio
async def test_a_removed_webhooks_delivery_fails_at_once_counted_once_as_removed(tmp_path: Path) -> None:
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await ledger.write([OutboxRow("gone", "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
        other = WebhookSettings(name="other", url="https://hooks.example/h", secret="s")
        before = _count("gone")
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {"other": other}, clock=Clock(T0))
        await sender.round()
        [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
        assert (state, error) == ("failed", "the webhook is no longer configured")
        after = _count("gone")
        assert {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)} == {"removed": 1}
    finally:
        await http.aclose()
        await ledger.close()


def test_the_docs_name_exactly_the_failure_reasons_counted() -> None:
    """docs/after-250.md's metrics table and the metric's help (docs/reference/metrics.md) name the reasons an
    alert is written against: every one the sender counts, and no other."""
    import re

    from gateway.returnpath.webhooks import FAILURE_REASONS

    [row] = [
        line
        for line in Path("docs/after-250.md").read_text().splitlines()
        if line.startswith("| `smtp_gateway_webhook_failures_total`")
    ]
    assert set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[4])) == set(FAILURE_REASONS)
    documented = WEBHOOK_FAILED._documentation.split("by reason class:", 1)[1]
    named = re.sub(r"\([^)]*\)", "", documented)  # the words in parentheses explain: the names stand outside
    assert {word.strip() for word in named.split(",")} == set(FAILURE_REASONS)
    reference = Path("docs/reference/metrics.md").read_text()
    assert documented.strip() in reference


def test_retries_are_at_most_an_hour_apart_and_jittered_below_it() -> None:
    """docs/after-250.md: backoff x 2^(n-1) s, +-50 % jitter, at most an hour apart (the cap after the jitter)."""
    import random

    from gateway.returnpath.webhooks import BACKOFF_MAX, backoff

    rng = random.Random(1)
    late = [backoff(10.0, 30, rng) for _ in range(1000)]
    assert max(late) == BACKOFF_MAX
    early = [backoff(10.0, 2, rng) for _ in range(1000)]
    assert 10.0 <= min(early) < 20.0 < max(early) <= 30.0


async def test_the_pending_gauge_of_a_removed_webhook_goes_to_zero(tmp_path: Path) -> None:
    """A webhook removed by a reload with deliveries pending: they fail as `removed`, and its
    smtp_gateway_webhook_pending reads 0 then, not its last count until a restart."""
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    hooks = {
        name: WebhookSettings(name=name, url="http://127.0.0.1:9/h", secret="s", timeout=5, backoff=1)
        for name in ("gone", "kept")
    }
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await ledger.write([OutboxRow("gone", "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: hooks, clock=Clock(T0))
        await sender.count_pending()
        assert WEBHOOK_PENDING.labels(webhook="gone")._value.get() == 1
        del hooks["gone"]  # the reload
        with capture_logs():
            await sender.round()  # the delivery fails as removed
        await sender.count_pending()
        assert WEBHOOK_PENDING.labels(webhook="gone")._value.get() == 0
    finally:
        await http.aclose()
        await ledger.close()
