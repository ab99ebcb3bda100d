"""Helpers for the contract suites of the queue's database (the queue, the ledger): stores on either
backend, one message shape, and new messages in a given state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from gateway.core.model import Address, Attachment, Call, Message, Principal, StoredData, Submission
from gateway.core.records import CallRow, Decision, RetryPolicy
from gateway.delivery import transition
from gateway.queue import codec
from gateway.queue.store import NewMessage


class _Closable(Protocol):
    async def close(self) -> None: ...


S = TypeVar("S", bound=_Closable)


async def stores_on_backend(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite: Callable[[Path], S], postgres: Callable[[str], S]
) -> AsyncIterator[Callable[[], S]]:
    """For a fixture parametrized "sqlite" / "postgresql": a factory of stores on one shared database (several
    stores are several instances on one queue), all closed at the end."""
    opened: list[S] = []
    url = request.getfixturevalue("pg_cluster").new_database() if request.param == "postgresql" else ""

    def factory() -> S:
        store = postgres(url) if url else sqlite(tmp_path / "queue.sqlite3")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


POLICY = RetryPolicy((10.0, 20.0), 0.0, 100.0)
PLAN = (Call("0", ("a@example.com", "c@example.com")), Call("1", ("b@example.com",)))


def submission() -> Submission:
    msg = Message(
        subject="Ünïcode subject",
        from_=Address("billing@acme.example", "Billing"),
        sender=None,
        reply_to=Address("help@acme.example"),
        to=(Address("a@example.com", "A"), Address("b@example.com")),
        cc=(Address("c@example.com", "C"),),
        html="<p>hi</p>",
        text="hi",
        attachments=(Attachment("x.bin", "application/octet-stream", bytes(range(256)), "cid1", True),),
        options={"archive": "yes"},
        message_id="<m@x>",
        x_headers=(("X-Ref", "42"),),
    )
    return Submission(
        # Provider data as the queue sees it: JSON it stores and gives back without reading it.
        principal=Principal("acme", "scanner", allowed_senders=("@acme.example",), extra=StoredData({"campaign": 22})),
        mail_from="billing@acme.example",
        rcpt_tos=("a@example.com", "b@example.com", "c@example.com"),
        message=msg,
        params=StoredData({"campaign": 22, "archive": True, "batch": None}),
    )


def new(
    msg_id: str,
    now: float | None = None,
    *,
    calls: dict[str, CallRow] | None = None,
    verdict: str = "queued",
    owner: str | None = None,
    account: str = "acme",
    key: str | None = None,
) -> NewMessage:
    now = time.time() if now is None else now
    before = transition.fresh(PLAN, now, POLICY)
    decision = Decision(
        verdict,
        dict(calls or before.calls),
        1,
        now,
        "boom",  # type: ignore[arg-type]
        dead_reason="refused" if verdict == "dead" else None,
    )
    record, blobs = codec.encode(submission())
    return NewMessage(
        id=msg_id,
        account=account,
        mail_from="billing@acme.example",
        subject="s",
        submission=record,
        blobs=blobs,
        decision=decision,
        inflight_owner=owner,
        lease_until=now + 30,
        created=now,
        expires=now + 100,
        idempotency_key=key,
    )
