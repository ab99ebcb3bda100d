"""Pure: a Submission <-> bytes for the queue (orjson; attachment bytes as base64). Versioned.

Version 2 is provider-neutral: Principal.extra and Submission.params are stored as their providers' JSON
(to_json) and come back as StoredData, which the provider reads as its own type. Version 1 records
(DMDS-shaped, from spools written before providers) are still read, so an upgraded gateway delivers what
an older one queued.
Attachments of BLOB_MIN bytes or more are not in the record: they are blobs (their base64 text), stored
apart in chunks by the queue, and come back carried as base64 (model.Attachment.b64).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.core.model import Address, Attachment, Message, Principal, StoredData, Submission

VERSION = 2
BLOB_MIN = 64 * 1024


class CodecError(ValueError):
    """A queued record that cannot be decoded (corrupt, or written by an unknown version)."""


def _addr(a: Address | None) -> list[str] | None:
    return None if a is None else [a.email, a.name]


def _unaddr(v: Any) -> Address | None:
    return None if v is None else Address(email=v[0], name=v[1])


def _addrs(v: list[Any]) -> tuple[Address, ...]:
    return tuple(Address(email=x[0], name=x[1]) for x in v)


def encode(s: Submission) -> tuple[bytes, list[bytes | memoryview]]:
    """The record and the blobs it refers to (large attachments' base64 text, not copied)."""
    p, m = s.principal, s.message
    blobs: list[bytes | memoryview] = []

    def attachment(a: Attachment) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "filename": a.filename,
            "content_type": a.content_type,
            "content_id": a.content_id,
            "inline": a.inline,
        }
        content = a.base64()
        if len(content) >= BLOB_MIN:
            entry["blob"] = len(blobs)
            blobs.append(content)
        else:
            entry["data"] = bytes(content).decode("ascii")
            entry["carried"] = a.b64 is not None
        return entry

    doc = {
        "v": VERSION,
        "principal": {
            "account": p.account,
            "login": p.login,
            "allowed_senders": list(p.allowed_senders),
            "default_from": p.default_from,
            "force_from": p.force_from,
            "extra": dict(p.extra.to_json()),
        },
        "mail_from": s.mail_from,
        "rcpt_tos": list(s.rcpt_tos),
        "message": {
            "subject": m.subject,
            "from": _addr(m.from_),
            "sender": _addr(m.sender),
            "reply_to": _addr(m.reply_to),
            "to": [_addr(a) for a in m.to],
            "cc": [_addr(a) for a in m.cc],
            "html": m.html,
            "text": m.text,
            "attachments": [attachment(a) for a in m.attachments],
            "options": m.options,
            "message_id": m.message_id,
            "x_headers": [list(h) for h in m.x_headers],
        },
        "params": dict(s.params.to_json()),
    }
    return orjson.dumps(doc), blobs


def _message(m: dict[str, Any], blobs: Sequence[bytes] | None) -> Message:
    return Message(
        subject=m["subject"],
        from_=_unaddr(m["from"]),
        sender=_unaddr(m["sender"]),
        reply_to=_unaddr(m["reply_to"]),
        to=_addrs(m["to"]),
        cc=_addrs(m["cc"]),
        html=m["html"],
        text=m["text"],
        attachments=tuple(_attachment(a, blobs) for a in m["attachments"]),
        options=dict(m["options"]),
        message_id=m["message_id"],
        x_headers=tuple((h[0], h[1]) for h in m.get("x_headers", [])),
    )


def _attachment(a: dict[str, Any], blobs: Sequence[bytes] | None) -> Attachment:
    if "blob" in a:  # without the blobs (`queue show`): names and types only
        content, carried = (blobs[a["blob"]] if blobs is not None else b""), True
    else:
        content, carried = a["data"].encode("ascii"), a.get("carried", False)
    return Attachment(
        filename=a["filename"],
        content_type=a["content_type"],
        data=b"" if carried else base64.b64decode(content),
        content_id=a["content_id"],
        inline=a["inline"],
        b64=content if carried else None,
    )


def _v2(doc: dict[str, Any], blobs: Sequence[bytes] | None) -> Submission:
    p = doc["principal"]
    return Submission(
        principal=Principal(
            account=p["account"],
            login=p["login"],
            allowed_senders=tuple(p["allowed_senders"]),
            default_from=p["default_from"],
            force_from=p["force_from"],
            extra=StoredData(dict(p["extra"])),
        ),
        mail_from=doc["mail_from"],
        rcpt_tos=tuple(doc["rcpt_tos"]),
        message=_message(doc["message"], blobs),
        params=StoredData(dict(doc["params"])),
    )


def _v1(doc: dict[str, Any], blobs: Sequence[bytes] | None) -> Submission:
    """A DMDS submission as the spool wrote it before providers: campaign fields move to extra/params, in
    the shape DMDS writes them (gateway/providers/dmds/data.py reads them)."""
    p = doc["principal"]
    extra = {
        "campaign": p["campaign"],
        "campaign_from_subject": p["campaign_from_subject"],
        "may_choose_campaign": p["may_choose_campaign"],
    }
    return Submission(
        principal=Principal(
            account=p["account"],
            login=p["login"],
            allowed_senders=tuple(p["allowed_senders"]),
            default_from=p["default_from"],
            force_from=p["force_from"],
            extra=StoredData(extra),
        ),
        mail_from=doc["mail_from"],
        rcpt_tos=tuple(doc["rcpt_tos"]),
        message=_message(doc["message"], blobs),
        params=StoredData({"campaign": doc["campaign"], "archive": doc["archive"], "batch": doc["batch_eeid"]}),
    )


def decode(data: bytes, blobs: Sequence[bytes] | None = ()) -> Submission:
    """The submission of a record and its blobs (None: not loaded, large attachments come back empty)."""
    try:
        doc = orjson.loads(data)
        version = doc.get("v")
        if version == VERSION:
            return _v2(doc, blobs)
        if version == 1:
            return _v1(doc, blobs)
        raise CodecError(f"unknown queue record version {version!r}")
    except CodecError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise CodecError(f"corrupt queue record: {type(exc).__name__}: {exc}") from None
