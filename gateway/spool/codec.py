"""Pure: a Submission <-> bytes for the spool (orjson; attachment bytes as base64). Versioned."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from gateway.model import Address, Attachment, Leg, Message, Principal, Submission

VERSION = 1


class CodecError(ValueError):
    """A spooled record that cannot be decoded (corrupt, or written by an unknown version)."""


def _addr(a: Address | None) -> list[str] | None:
    return None if a is None else [a.email, a.name]


def _unaddr(v: Any) -> Address | None:
    return None if v is None else Address(email=v[0], name=v[1])


def encode(s: Submission) -> bytes:
    p, m = s.principal, s.message
    doc = {
        "v": VERSION,
        "principal": {
            "account": p.account, "login": p.login, "campaign": p.campaign,
            "campaign_from_subject": p.campaign_from_subject, "may_choose_campaign": p.may_choose_campaign,
            "allowed_senders": list(p.allowed_senders), "default_from": p.default_from, "force_from": p.force_from,
        },
        "mail_from": s.mail_from,
        "rcpt_tos": list(s.rcpt_tos),
        "message": {
            "subject": m.subject, "from": _addr(m.from_), "sender": _addr(m.sender), "reply_to": _addr(m.reply_to),
            "to": [_addr(a) for a in m.to], "cc": [_addr(a) for a in m.cc], "html": m.html, "text": m.text,
            "attachments": [
                {"filename": a.filename, "content_type": a.content_type,
                 "data": base64.b64encode(a.data).decode("ascii"), "content_id": a.content_id, "inline": a.inline}
                for a in m.attachments
            ],
            "options": m.options, "message_id": m.message_id,
        },
        "campaign": s.campaign,
        "legs": [
            {"index": leg.index, "contacts": [_addr(a) for a in leg.contacts],
             "cc": [_addr(a) for a in leg.cc], "bcc": [_addr(a) for a in leg.bcc]}
            for leg in s.legs
        ],
        "archive": s.archive,
        "batch_eeid": s.batch_eeid,
    }
    return orjson.dumps(doc)


def _addrs(v: list[Any]) -> tuple[Address, ...]:
    return tuple(Address(email=x[0], name=x[1]) for x in v)


def decode(data: bytes) -> Submission:
    try:
        doc = orjson.loads(data)
        if doc.get("v") != VERSION:
            raise CodecError(f"unknown spool record version {doc.get('v')!r}")
        p, m = doc["principal"], doc["message"]
        return Submission(
            principal=Principal(
                account=p["account"], login=p["login"], campaign=p["campaign"],
                campaign_from_subject=p["campaign_from_subject"], may_choose_campaign=p["may_choose_campaign"],
                allowed_senders=tuple(p["allowed_senders"]), default_from=p["default_from"],
                force_from=p["force_from"],
            ),
            mail_from=doc["mail_from"],
            rcpt_tos=tuple(doc["rcpt_tos"]),
            message=Message(
                subject=m["subject"], from_=_unaddr(m["from"]), sender=_unaddr(m["sender"]),
                reply_to=_unaddr(m["reply_to"]), to=_addrs(m["to"]), cc=_addrs(m["cc"]), html=m["html"],
                text=m["text"],
                attachments=tuple(
                    Attachment(filename=a["filename"], content_type=a["content_type"],
                               data=base64.b64decode(a["data"]), content_id=a["content_id"], inline=a["inline"])
                    for a in m["attachments"]
                ),
                options=dict(m["options"]), message_id=m["message_id"],
            ),
            campaign=doc["campaign"],
            legs=tuple(
                Leg(index=leg["index"], contacts=_addrs(leg["contacts"]), cc=_addrs(leg["cc"]), bcc=_addrs(leg["bcc"]))
                for leg in doc["legs"]
            ),
            archive=doc["archive"],
            batch_eeid=doc["batch_eeid"],
        )
    except CodecError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise CodecError(f"corrupt spool record: {type(exc).__name__}: {exc}") from None
