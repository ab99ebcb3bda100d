"""Pure: a message's idempotency key, from the X-Gateway-Idempotency-Key header or (opt-in per account)
its Message-ID with the envelope, and the digest of what the message says, kept with the key so that a
key reused for another message is told apart from a resend. Both stored hashed: a key may be long or
carry something private."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from gateway.core.model import Address, Submission

OPTION = "idempotency-key"
# Attachments and bodies larger than this together are digested off the event loop (the caller's choice).
DIGEST_IN_THREAD_BYTES = 256 * 1024


def key_of(submission: Submission, from_message_id: bool) -> str | None:
    message = submission.message
    explicit = (message.options.get(OPTION) or "").strip()
    if explicit:
        material = f"header\0{explicit}"
    elif from_message_id and message.message_id:
        # The same Message-ID to other recipients or from another sender is another message.
        envelope = "\0".join([submission.mail_from.lower(), *sorted(r.lower() for r in submission.rcpt_tos)])
        material = f"message-id\0{message.message_id.strip()}\0{envelope}"
    else:
        return None
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def digest_of(submission: Submission) -> str:
    """What makes this message this message: the envelope, the headers the recipients read (From, Sender,
    Reply-To, To, Cc, Subject, X- headers), the X-Gateway options (but the key itself), the bodies and every
    attachment. Not the Date or the Message-ID: a client that builds the message again to resend it writes
    new ones. Not the provider's decisions (a dEngage reference is chosen anew for every message)."""
    m = submission.message
    h = hashlib.sha256()

    def text(*parts: str | None) -> None:
        for part in parts:
            # Each part with its length: no two different lists of parts feed the same bytes.
            data = (part if part is not None else "\0none").encode("utf-8", "surrogateescape")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)

    def addresses(*found: Address | None) -> None:
        text(str(len(found)))
        for a in found:
            text(*(("",) if a is None else (a.email.lower(), a.name)))

    text(submission.mail_from.lower(), *sorted(r.lower() for r in submission.rcpt_tos))
    addresses(m.from_, m.sender, m.reply_to)
    addresses(*m.to)
    addresses(*m.cc)
    text(m.subject, *(f"{n.lower()}: {v}" for n, v in m.x_headers))
    text(*(f"{n}: {v}" for n, v in sorted(m.options.items()) if n != OPTION))
    text(m.html, m.text)
    for a in m.attachments:
        text(a.filename, a.content_type, a.content_id, str(a.inline))
        # As carried: the same bytes arrive the same way (decoded, or as the base64 text they came in).
        content = a.b64 if a.b64 is not None else a.data
        h.update(b"b64" if a.b64 is not None else b"raw")
        h.update(len(content).to_bytes(8, "big"))
        h.update(content)
    return h.hexdigest()


def digest_size(submission: Submission) -> int:
    """About how many bytes digest_of reads: whether it belongs on a worker thread."""
    m = submission.message
    return len(m.html) + len(m.text or "") + sum(len(a.b64 if a.b64 is not None else a.data) for a in m.attachments)


@dataclass(slots=True)
class LateKey:
    """An idempotency key the queue could not record when its message was taken (the queue was down)."""

    account: str
    key: str
    msg_id: str
    created: float
    expires: float
    digest: str | None  # what the message said (None only for a message that has none: a bounce notice)
    reply_id: str | None = None  # None while the message is being delivered
    claimed: bool = False  # the queue has the key's claim: only the answer is missing


class KeyBacklog:
    """The late keys of this process, in memory until the queue can record them (oldest dropped past
    `limit`); meanwhile they answer the resends that reach this process."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._keys: OrderedDict[tuple[str, str], LateKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, account: str, key: str) -> LateKey | None:
        return self._keys.get((account, key))

    def add(self, late: LateKey) -> LateKey | None:
        """Keep `late`; returns the oldest key given up to make room, if one was."""
        self._keys[(late.account, late.key)] = late
        self._keys.move_to_end((late.account, late.key))
        return self._keys.popitem(last=False)[1] if len(self._keys) > self.limit else None

    def remove(self, late: LateKey) -> None:
        if self._keys.get((late.account, late.key)) is late:
            del self._keys[(late.account, late.key)]

    def answered(self) -> list[LateKey]:
        """The keys whose messages have their answer: ready to be recorded."""
        return [late for late in self._keys.values() if late.reply_id is not None]
