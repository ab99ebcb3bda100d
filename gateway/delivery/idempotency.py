"""Pure: a message's idempotency key, from the X-Gateway-Idempotency-Key header or (opt-in per account)
its Message-ID with the envelope. Stored hashed: a key may be long or carry something private."""

from __future__ import annotations

import hashlib

from gateway.core.model import Submission

OPTION = "idempotency-key"


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
