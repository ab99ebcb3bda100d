"""Pure: whom a delivery status notice about a message goes to, and what it needs later, kept with the
message's ledger record when (and only when) somebody would be told.

A notice goes to the envelope sender, or to the login's (else the account's) `notify` address, or to nobody
(`notify = "off"`); never for a null sender, never about a notice. It is sent through the message's own
account, as its own login, under the message's provider data (DMDS: its campaign), so `extra` and
`params` are kept; and it quotes the message's header block (RFC 3464 text/rfc822-headers).

The queue keeps whom to tell and the header block with the message too (`queued`), in its own row: an
instance that claims a message whose accepting instance died before writing its record makes the same
notice data from them and the queued submission (`rebuilt`). When nobody would be told, the queue row and
the record rebuilt from it keep `NOBODY` (`{"to": null}`), not nothing: a row without notice data is one
stored before the queue kept it (an older version), and the two are skipped for different reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.core.model import Origin, Submission

# Kept in a queue row (and the record rebuilt from it) when nobody would be told (notify = off, a null
# sender, a notice): a row of this version, unlike NULL (a row stored before the queue kept notice data).
NOBODY = orjson.dumps({"to": None}).decode()


def target(notify: str, mail_from: str) -> str | None:
    """The address `notify` (`sender`, `off` or an address) names for a message from `mail_from`."""
    if not mail_from:
        return None  # a null sender: never notified (a bounce of a bounce)
    if notify == "off":
        return None
    return mail_from if notify == "sender" else notify


@dataclass(frozen=True, slots=True)
class NoticeData:
    to: str
    headers: str = ""
    login: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    from_address: str | None = None  # the message's From, after the sender policy

    def to_json(self) -> str:
        return _json(self.to, self.headers, self.login, self.extra, self.params, self.from_address)

    @staticmethod
    def read(text: str) -> NoticeData:
        """From the ledger's `notice` column; ValueError when it is not one this gateway wrote."""
        data = orjson.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("to"), str):
            raise ValueError("not notice data")
        return NoticeData(
            to=data["to"],
            headers=str(data.get("headers") or ""),
            login=str(data.get("login") or ""),
            extra=dict(data.get("extra") or {}),
            params=dict(data.get("params") or {}),
            from_address=data.get("from"),
        )


def of(submission: Submission, origin: Origin | None) -> str | None:
    """The notice data of an accepted message (JSON text), or None when nobody would be told."""
    if origin is None or origin.notify is None or origin.dsn_of is not None:
        return None
    message = submission.message
    return _json(
        origin.notify,
        origin.headers or "",
        submission.principal.login,
        submission.principal.extra.to_json(),
        submission.params.to_json(),
        message.from_.email if message.from_ is not None else None,
    )


def queued(origin: Origin | None) -> str:
    """What the queue keeps with a message for a notice about it (JSON text), or `NOBODY` when nobody would
    be told: only what its stored submission does not hold, whom to tell and the header block as received
    (bounded by the header block's own limit). An instance that claims the message makes the record's notice
    data from it with `rebuilt` if the accepting instance died before writing the record."""
    if origin is None or origin.notify is None or origin.dsn_of is not None:
        return NOBODY
    return orjson.dumps({"to": origin.notify, "headers": origin.headers or ""}).decode()


def rebuilt(submission: Submission, kept: str | None) -> str | None:
    """The notice data (JSON text) `of` made at acceptance, made again from the queued submission and what
    `queued` kept with it; `NOBODY` when that was kept (nobody would be told: `of` made None, but the
    record must not read as one rebuilt from an older version's row); None when nothing was kept (a row
    stored before the queue kept it) or what was kept is not `queued`'s."""
    if kept is None:
        return None
    if nobody(kept):
        return NOBODY
    try:
        data = orjson.loads(kept)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("to"), str):
        return None
    message = submission.message
    return _json(
        data["to"],
        str(data.get("headers") or ""),
        submission.principal.login,
        submission.principal.extra.to_json(),
        submission.params.to_json(),
        message.from_.email if message.from_ is not None else None,
    )


def nobody(text: str) -> bool:
    """Whether `text` (a queue row's or a record's notice data) is `NOBODY`: nobody would be told."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and "to" in data and data["to"] is None


def _json(
    to: str, headers: str, login: str, extra: Mapping[str, Any], params: Mapping[str, Any], from_address: str | None
) -> str:
    """NoticeData's JSON text (made for every message that has a notice target: without the dataclass)."""
    return orjson.dumps(
        {
            "to": to,
            "headers": headers,
            "login": login,
            "extra": dict(extra),
            "params": dict(params),
            "from": from_address,
        }
    ).decode()
