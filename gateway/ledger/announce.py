"""Pure: which webhooks an event goes to, and the JSON each receives (fixed when the event is recorded, so a
retry POSTs the same bytes). A webhook's delivery is an OutboxRow written in the event's own transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.ledger.model import OutboxRow, iso


class _Webhook(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def events(self) -> list[str]: ...

    @property
    def accounts(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Subscription:
    name: str
    events: frozenset[str]
    accounts: frozenset[str]  # empty: every account

    def wants(self, kind: str, account: str) -> bool:
        return kind in self.events and (not self.accounts or account in self.accounts)


class Subscriptions:
    """The configured webhooks, as the recorder and the pollers ask them: who wants this event?"""

    def __init__(self, webhooks: Sequence[_Webhook] = ()) -> None:
        self.all = tuple(Subscription(w.name, frozenset(w.events), frozenset(w.accounts)) for w in webhooks)

    def __bool__(self) -> bool:
        return bool(self.all)

    def targets(self, kind: str, account: str) -> list[str]:
        return [s.name for s in self.all if s.wants(kind, account)]


@dataclass(frozen=True, slots=True)
class About:
    """The message an event is about, as far as it is known."""

    msg_id: str
    created: float
    account: str
    reply_id: str | None = None
    message_id: str | None = None
    mail_from: str | None = None
    subject: str | None = None
    login: str | None = None


def body(
    event_id: str,
    kind: str,
    at: float,
    about: About,
    recipient: str,
    state: str | None,
    *,
    upstream_id: str | None = None,
    upstream_event: str | None = None,
    detail: str | None = None,
) -> str:
    """The JSON a webhook receives for one event about one recipient (docs/after-250.md#webhooks)."""
    doc: dict[str, Any] = {
        "id": event_id,
        "type": kind,
        "at": iso(at),
        "account": about.account,
        "message": {
            "id": about.msg_id,
            "reply_id": about.reply_id,
            "message_id": about.message_id,
            "mail_from": about.mail_from,
            "subject": about.subject,
            "login": about.login,
            "created": iso(about.created),
        },
        "recipient": recipient,
        "state": state,
        "upstream": {"id": upstream_id, "event": upstream_event} if upstream_event or upstream_id else None,
        "detail": detail,
    }
    return orjson.dumps(doc).decode()


def outbox(
    subscriptions: Subscriptions, kind: str, event_id: str, about: About, now: float, text: str
) -> list[OutboxRow]:
    """The deliveries of one event: one row per webhook that wants it."""
    return [
        OutboxRow(name, event_id, about.msg_id, about.created, now, kind, text)
        for name in subscriptions.targets(kind, about.account)
    ]
